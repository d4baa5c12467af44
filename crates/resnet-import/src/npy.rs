//! `.npy` files of float32 tensors: how inputs and outputs are exchanged with numpy.

use std::io::BufWriter;
use std::path::Path;

use npyz::WriterBuilder;

use crate::error::{ImportError, io_error, one_line};

fn npy_error(path: &Path, message: impl std::fmt::Display) -> ImportError {
    ImportError::Record {
        path: path.into(),
        message: one_line(message),
    }
}

/// Read a float32 (or float64, converted) C-ordered `.npy` array: `(shape, values)`.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), ImportError> {
    let bytes = std::fs::read(path).map_err(|source| io_error(path, source))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .map_err(|err| npy_error(path, format!("not a .npy file ({err})")))?;
    if npy.order() != npyz::Order::C {
        return Err(npy_error(path, "Fortran-ordered arrays are not supported"));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let dtype = npy.dtype();
    let values: Vec<f32> = match dtype.descr().as_str() {
        "'<f4'" => npy.into_vec::<f32>(),
        "'<f8'" => npy
            .into_vec::<f64>()
            .map(|v| v.into_iter().map(|x| x as f32).collect()),
        other => {
            return Err(npy_error(
                path,
                format!("dtype {other} is not float32 or float64"),
            ));
        }
    }
    .map_err(|err| npy_error(path, format!("truncated or corrupt .npy data ({err})")))?;
    Ok((shape, values))
}

/// Write a float32 C-ordered `.npy` array atomically (temp file in the same directory, then
/// rename): a failure leaves no partial file at `path`.
pub fn write_f32(path: &Path, shape: &[usize], values: &[f32]) -> Result<(), ImportError> {
    let io = |source| ImportError::Io {
        path: path.into(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    {
        let mut writer = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>())
            .writer(BufWriter::new(tmp.as_file()))
            .begin_nd()
            .map_err(io)?;
        writer.extend(values.iter().copied()).map_err(io)?;
        writer.finish().map_err(io)?;
    }
    tmp.persist(path).map_err(|err| io(err.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[2, 3, 4], &values).unwrap();
        assert_eq!(read_f32(&path).unwrap(), (vec![2, 3, 4], values));

        std::fs::write(&path, b"not numpy").unwrap();
        let err = read_f32(&path).unwrap_err().to_string();
        assert!(err.contains("not a .npy file"), "{err}");
        assert!(matches!(
            read_f32(&dir.path().join("missing.npy")),
            Err(ImportError::NotFound(_))
        ));
    }
}
