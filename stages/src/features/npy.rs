//! NumPy `.npy` (version 1–3): a 2-D little-endian array in C order.

use super::{Array2, Dtype, array2};

/// Parses a `.npy` file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Array2<'_>, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start + len).ok_or(".npy header is truncated")?;
    let header = std::str::from_utf8(header).map_err(|_| ".npy header is not text")?;
    let field = |name: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{name}'")).ok_or_else(|| format!(".npy header lacks '{name}'"))?;
        Ok(header[at + name.len() + 2..].trim_start().trim_start_matches(':').trim_start())
    };
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-ordered .npy is not supported; save with order='C'".into());
    }
    let descr = field("descr")?;
    let descr = descr.trim_start_matches(['\'', '"']);
    let descr = &descr[..descr.find(['\'', '"']).ok_or("bad descr")?];
    let dtype = match descr {
        "<f4" => Dtype::F32,
        "<f2" => Dtype::F16,
        "<f8" => Dtype::F64,
        other => return Err(format!("unsupported .npy dtype {other}")),
    };
    let shape = field("shape")?;
    let shape = &shape[1..shape.find(')').ok_or("bad shape")?];
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("bad shape entry {s}")))
        .collect::<Result<_, String>>()?;
    array2(dtype, &shape, &bytes[start + len..], "features")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (header.len() + 11) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn reads_2d_float32() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = npy("<f4", "(3, 2)", &data);
        let a = parse(&bytes).unwrap();
        assert_eq!((a.rows, a.cols), (3, 2));
        assert_eq!(a.to_f32(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn truncated_and_wrong_shape_are_errors() {
        let bytes = npy("<f4", "(3, 2)", &[0; 20]);
        assert!(parse(&bytes).unwrap_err().contains("truncated"));
        assert!(parse(&npy("<f4", "(6,)", &[0; 24])).unwrap_err().contains("1-D"));
        assert!(parse(&npy("<i4", "(3, 2)", &[0; 24])).unwrap_err().contains("<i4"));
        assert!(parse(b"garbage").unwrap_err().contains("magic"));
    }
}
