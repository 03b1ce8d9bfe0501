//! Synthetic datasets in CLAM layout (`pt_files/<slide>.pt` written in PyTorch's own `torch.save`
//! format, or `h5_files/<slide>.h5` with `features` and `coords` as CLAM writes them, plus
//! `labels.csv`), shaped like BRACS (its class counts, some patients with two slides) or PANDA
//! (its ISUP grade counts, 32-hex image ids, its `train.csv` columns, one biopsy per case), with
//! lognormal bag sizes and a learnable hierarchical signal: a few instances per bag carry a
//! shared coarse-class direction plus a weaker fine-class direction.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};
use crate::rng::Rng;

/// BRACS fine classes, their coarse classes, and slide counts (545 WSIs).
pub const BRACS: [(&str, &str, usize); 7] = [
    ("N", "benign", 43),
    ("PB", "benign", 147),
    ("UDH", "benign", 73),
    ("FEA", "atypical", 41),
    ("ADH", "atypical", 48),
    ("DCIS", "malignant", 61),
    ("IC", "malignant", 132),
];

/// PANDA's ISUP grades as `workflows/panda.toml` groups them, and image counts (its train.csv).
pub const PANDA: [(&str, &str, usize); 6] = [
    ("0", "benign", 2892),
    ("1", "low_grade", 2666),
    ("2", "low_grade", 1343),
    ("3", "high_grade", 1242),
    ("4", "high_grade", 1249),
    ("5", "high_grade", 1224),
];

/// Which cohort to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Bracs,
    Panda,
}

impl Preset {
    /// The preset named `name` (`bracs`, `panda`).
    pub fn named(name: &str) -> Option<Preset> {
        match name {
            "bracs" => Some(Preset::Bracs),
            "panda" => Some(Preset::Panda),
            _ => None,
        }
    }

    /// (fine class, coarse class, slides).
    fn classes(self) -> &'static [(&'static str, &'static str, usize)] {
        match self {
            Preset::Bracs => &BRACS,
            Preset::Panda => &PANDA,
        }
    }

    fn header(self) -> &'static str {
        match self {
            Preset::Bracs => "case_id,slide_id,label",
            Preset::Panda => "image_id,data_provider,isup_grade,gleason_score",
        }
    }

    /// The label file's row for one slide.
    fn row(self, case: &str, slide: &str, label: &str) -> String {
        match self {
            Preset::Bracs => format!("{case},{slide},{label}"),
            Preset::Panda => {
                let gleason = ["0+0", "3+3", "3+4", "4+3", "4+4", "4+5"][label.parse::<usize>().unwrap_or(0).min(5)];
                let provider = if slide.as_bytes()[0].is_multiple_of(2) { "karolinska" } else { "radboud" };
                format!("{slide},{provider},{label},{gleason}")
            }
        }
    }
}

/// Which feature files to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    /// `pt_files/<slide>.pt`: a float32 tensor, as `torch.save` writes it.
    Pt,
    /// `h5_files/<slide>.h5`: `features` (float32) and `coords` (int64 patch positions).
    H5,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub preset: Preset,
    pub format: SynthFormat,
    /// Multiplies every class count (at least 3 slides per class are kept).
    pub scale: f64,
    /// Median instances per bag.
    pub mean_instances: usize,
    pub dim: usize,
    pub seed: u64,
}

/// What was generated.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSummary {
    pub slides: usize,
    pub cases: usize,
    pub instances: usize,
}

/// Writes `out/pt_files/*.pt` (or `out/h5_files/*.h5`) and `out/labels.csv` (PANDA:
/// `out/train.csv`).
pub fn generate(out: &Path, opts: &SynthOptions, progress: &dyn Fn(usize, usize)) -> Result<SynthSummary> {
    let feature_dir = out.join(match opts.format {
        SynthFormat::Pt => "pt_files",
        SynthFormat::H5 => "h5_files",
    });
    std::fs::create_dir_all(&feature_dir).map_err(|e| Error::io(&feature_dir, e))?;
    let mut rng = Rng::new(opts.seed, 0);
    let d = opts.dim;
    let unit = |rng: &mut Rng| {
        let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f64>>()
    };
    let classes = opts.preset.classes();
    let coarse_names: Vec<&str> = {
        let mut c: Vec<&str> = classes.iter().map(|b| b.1).collect();
        c.dedup();
        c
    };
    let coarse_dir: Vec<Vec<f64>> = coarse_names.iter().map(|_| unit(&mut rng)).collect();
    let fine_dir: Vec<Vec<f64>> = classes.iter().map(|_| unit(&mut rng)).collect();
    let scale = (d as f64).sqrt();

    // Slides per class, grouped into cases: for BRACS every seventh case has two slides; a PANDA
    // biopsy is its own case, named by a 32-hex image id.
    let mut slides: Vec<(String, String, usize)> = Vec::new();
    let mut case_no = 0;
    for (fine, &(_, _, count)) in classes.iter().enumerate() {
        let n = ((count as f64 * opts.scale).round() as usize).max(3);
        let mut i = 0;
        while i < n {
            case_no += 1;
            let slides_in_case = if opts.preset == Preset::Bracs && case_no % 7 == 0 && i + 1 < n { 2 } else { 1 };
            for _ in 0..slides_in_case {
                let (slide, case) = match opts.preset {
                    Preset::Bracs => (format!("{:06}", slides.len() + 1), format!("case_{case_no:04}")),
                    Preset::Panda => {
                        let id = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
                        (id.clone(), id)
                    }
                };
                slides.push((slide, case, fine));
                i += 1;
            }
        }
    }
    let csv_path = out.join(match opts.preset {
        Preset::Bracs => "labels.csv",
        Preset::Panda => "train.csv",
    });
    let mut csv = BufWriter::new(File::create(&csv_path).map_err(|e| Error::io(&csv_path, e))?);
    writeln!(csv, "{}", opts.preset.header()).map_err(|e| Error::io(&csv_path, e))?;
    let sigma: f64 = 0.5;
    let mut instances = 0;
    let mut feats = Vec::new();
    for (k, (slide, case, fine)) in slides.iter().enumerate() {
        writeln!(csv, "{}", opts.preset.row(case, slide, classes[*fine].0)).map_err(|e| Error::io(&csv_path, e))?;
        let z = rng.normal();
        let n =
            ((opts.mean_instances as f64).ln() + sigma * z).exp().round().clamp(8.0, 8.0 * opts.mean_instances as f64)
                as usize;
        let coarse = coarse_names.iter().position(|c| *c == classes[*fine].1).expect("coarse listed");
        feats.clear();
        for _ in 0..n {
            let informative = rng.uniform() < 0.1;
            for j in 0..d {
                let mut x = rng.normal() * 0.5;
                if informative {
                    x += scale * (0.3 * coarse_dir[coarse][j] + 0.2 * fine_dir[*fine][j]);
                }
                feats.push(x.max(0.0) as f32);
            }
        }
        match opts.format {
            SynthFormat::Pt => write_pt(&feature_dir.join(format!("{slide}.pt")), &feats, n, d)?,
            SynthFormat::H5 => write_h5(&feature_dir.join(format!("{slide}.h5")), &feats, n, d)?,
        }
        instances += n;
        progress(k + 1, slides.len());
    }
    csv.flush().map_err(|e| Error::io(&csv_path, e))?;
    let cases = slides.iter().map(|s| &s.1).collect::<std::collections::HashSet<_>>().len();
    Ok(SynthSummary { slides: slides.len(), cases, instances })
}

/// Writes a float32 (rows × cols) tensor exactly as `torch.save(tensor, path)` lays it out.
pub fn write_pt(path: &Path, values: &[f32], rows: usize, cols: usize) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    let zerr = |e: zip::result::ZipError| Error::BadFile { path: path.into(), message: e.to_string() };
    let archive = path.file_stem().map_or("archive".into(), |s| s.to_string_lossy().into_owned());
    let mut zip = zip::ZipWriter::new(BufWriter::new(File::create(path).map_err(io)?));
    let opts = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut entry = |name: &str, bytes: &[u8], large: bool| -> Result<()> {
        zip.start_file_aligned(format!("{archive}/{name}"), opts.large_file(large), 64).map_err(zerr)?;
        zip.write_all(bytes).map_err(io)
    };
    entry("data.pkl", &tensor_pickle(rows, cols), false)?;
    entry("byteorder", b"little", false)?;
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    entry("data/0", &data, data.len() >= u32::MAX as usize)?;
    entry("version", b"3\n", false)?;
    zip.finish().map_err(zerr)?.flush().map_err(io)
}

/// Writes a CLAM `.h5`: `features` (rows × cols float32) and `coords` (rows × 2 int64), the
/// top-left corners of 256-pixel patches on a square grid.
pub fn write_h5(path: &Path, values: &[f32], rows: usize, cols: usize) -> Result<()> {
    let side = (rows as f64).sqrt().ceil().max(1.0) as usize;
    let coords: Vec<i64> = (0..rows).flat_map(|i| [(i % side) as i64 * 256, (i / side) as i64 * 256]).collect();
    crate::features::h5::write(path, values, (rows, cols), &coords, None)
        .map_err(|message| Error::BadFile { path: path.into(), message })
}

/// The pickle `torch.save` writes for a contiguous float32 tensor in storage `0`.
fn tensor_pickle(rows: usize, cols: usize) -> Vec<u8> {
    let mut p = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((X\x07\x00\x00\x00storageq\x01ctorch\nFloatStorage\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04".to_vec();
    let int = |p: &mut Vec<u8>, v: usize| {
        if v < 256 {
            p.extend([b'K', v as u8]);
        } else if v < (1 << 31) {
            p.push(b'J');
            p.extend((v as i32).to_le_bytes());
        } else {
            p.extend([0x8a, 8]);
            p.extend((v as i64).to_le_bytes());
        }
    };
    int(&mut p, rows * cols);
    p.extend(b"tq\x05QK\x00");
    int(&mut p, rows);
    int(&mut p, cols);
    p.push(0x86);
    int(&mut p, cols);
    int(&mut p, 1);
    p.extend(b"\x86\x89ccollections\nOrderedDict\nq\x06)Rq\x07tq\x08Rq\x09.");
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{Format, parse};

    #[test]
    fn written_pt_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.pt");
        let values: Vec<f32> = (0..300 * 3).map(|i| i as f32 * 0.5).collect();
        write_pt(&path, &values, 300, 3).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let a = parse(Format::Pt, &bytes).unwrap();
        assert_eq!((a.features.rows, a.features.cols), (300, 3));
        assert_eq!(a.features.to_f32(), values);
        assert!(a.coords.is_none());
    }

    #[test]
    fn written_h5_reads_back_with_coords() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            preset: Preset::Bracs,
            format: SynthFormat::H5,
            scale: 0.02,
            mean_instances: 10,
            dim: 4,
            seed: 1,
        };
        let s = generate(dir.path(), &opts, &|_, _| {}).unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path().join("h5_files")).unwrap().collect();
        assert_eq!(files.len(), s.slides);
        let bytes = std::fs::read(dir.path().join("h5_files/000001.h5")).unwrap();
        let a = parse(Format::H5, &bytes).unwrap();
        assert_eq!(a.features.cols, 4);
        let coords = a.coords.expect("coords").to_f64();
        assert_eq!(coords.len(), 2 * a.features.rows);
        assert_eq!(&coords[..4], &[0.0, 0.0, 256.0, 0.0]);
    }

    #[test]
    fn bracs_shape_and_determinism() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            preset: Preset::Bracs,
            format: SynthFormat::Pt,
            scale: 0.1,
            mean_instances: 16,
            dim: 8,
            seed: 3,
        };
        let s = generate(dir.path(), &opts, &|_, _| {}).unwrap();
        // max(3, round(0.1 * count)) per class: 4+15+7+4+5+6+13.
        assert_eq!(s.slides, 54);
        assert!(s.cases < s.slides, "some cases have two slides");
        let csv = std::fs::read_to_string(dir.path().join("labels.csv")).unwrap();
        assert!(csv.starts_with("case_id,slide_id,label\ncase_0001,000001,N\n"), "{csv}");
        let again = tempfile::tempdir().unwrap();
        generate(again.path(), &opts, &|_, _| {}).unwrap();
        for f in ["labels.csv", "pt_files/000007.pt"] {
            assert_eq!(std::fs::read(dir.path().join(f)).unwrap(), std::fs::read(again.path().join(f)).unwrap());
        }
    }

    #[test]
    fn panda_has_its_ids_grades_and_columns() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            preset: Preset::Panda,
            format: SynthFormat::Pt,
            scale: 0.002,
            mean_instances: 8,
            dim: 4,
            seed: 5,
        };
        let s = generate(dir.path(), &opts, &|_, _| {}).unwrap();
        // max(3, round(0.002 * count)) per grade: 6+5+3+3+3+3.
        assert_eq!((s.slides, s.cases), (23, 23), "one biopsy per case");
        let csv = std::fs::read_to_string(dir.path().join("train.csv")).unwrap();
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("image_id,data_provider,isup_grade,gleason_score"));
        for line in lines {
            let f: Vec<&str> = line.split(',').collect();
            assert!(f[0].len() == 32 && f[0].chars().all(|c| c.is_ascii_hexdigit()), "{line}");
            assert!(dir.path().join(format!("pt_files/{}.pt", f[0])).is_file(), "{line}");
            assert!(["karolinska", "radboud"].contains(&f[1]) && ("0"..="5").contains(&f[2]), "{line}");
        }
    }
}
