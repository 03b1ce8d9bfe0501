//! `hmil-flow predict`: a checkpoint applied to feature files outside any workflow.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array};
use models::Batch;
use tch::{Device, Kind, Tensor};

use super::checkpoint;
use super::infer::argmax;
use super::train::Classes;
use crate::error::{Error, Result};
use crate::features::{self, Format};
use crate::index::feature_files;
use crate::table;

/// The classes to name predictions by: the checkpoint's own, checked against the workflow's
/// when both are given; the workflow's for a checkpoint without them; else an error.
pub(crate) fn classes_for(checkpoint: &Path, from_workflow: Option<Classes>) -> Result<Classes> {
    let bad = |message: String| Error::BadFile { path: checkpoint.into(), message };
    match (checkpoint::read_info(checkpoint)?, from_workflow) {
        (Some(info), Some(wf)) if info.classes != wf => Err(bad(format!(
            "was trained for fine classes {:?} (coarse {:?}) but the workflow declares {:?} (coarse {:?}); \
             leave out --workflow to use the checkpoint's own",
            info.classes.fine, info.classes.coarse, wf.fine, wf.coarse
        ))),
        (Some(info), _) => Ok(info.classes),
        (None, Some(wf)) => Ok(wf),
        (None, None) => Err(bad("carries no class names or hierarchy (a checkpoint from PyTorch, or from \
             hmil-flow before they were kept); pass --workflow with the workflow it was trained with"
            .into())),
    }
}

/// The feature files at `features` (a file or a directory), each with its slide id (the stem).
pub(crate) fn feature_inputs(features: &Path) -> Result<Vec<(String, std::path::PathBuf, Format)>> {
    if features.is_dir() {
        return feature_files(features);
    }
    let format = Format::of(features)
        .ok_or_else(|| Error::BadFile { path: features.into(), message: "unknown feature file extension".into() })?;
    let slide = features.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(vec![(slide, features.to_path_buf(), format)])
}

/// Predicts every feature file at `features` (a file or a directory) and writes `out`; returns
/// the number of slides. Classes come from the checkpoint, or from `classes` (a workflow's) for a
/// checkpoint that does not carry them.
pub fn predict(
    checkpoint: &Path,
    features: &Path,
    classes: Option<Classes>,
    out: &Path,
    device: Device,
) -> Result<usize> {
    let classes = classes_for(checkpoint, classes)?;
    let files = feature_inputs(features)?;
    let mut model = None;
    let mut rows: Vec<(String, String, Vec<f64>, Vec<f64>)> = Vec::new();
    let _guard = tch::no_grad_guard();
    for (slide, path, format) in &files {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let arrays =
            features::parse(*format, &bytes).map_err(|message| Error::BadFile { path: path.clone(), message })?;
        let (n, d) = (arrays.features.rows as i64, arrays.features.cols as i64);
        if model.is_none() {
            model = Some(checkpoint::load(checkpoint, &classes, d, device)?);
        }
        let net = &model.as_ref().expect("built above").net;
        let x = Tensor::from_slice(&arrays.features.to_f32()).view([n, d]).to(device);
        let out = net.forward(&Batch::new(x, vec![n]), false);
        let probs = |t: &Tensor| -> Vec<f64> {
            Vec::try_from(t.softmax(-1, Kind::Double).view([-1]).to(Device::Cpu)).expect("double tensor")
        };
        rows.push((
            slide.clone(),
            path.to_string_lossy().into_owned(),
            probs(&out.fine_logits),
            probs(&out.coarse_logits),
        ));
    }
    if model.is_none() {
        return Ok(0);
    }
    let from_fine: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            let mut c = vec![0.0; classes.coarse.len()];
            for (f, &k) in classes.fine_to_coarse.iter().enumerate() {
                c[k] += r.2[f];
            }
            c
        })
        .collect();
    let mut cols: Vec<ArrayRef> = vec![
        table::string_col(rows.iter().map(|r| r.0.as_str())),
        table::string_col(rows.iter().map(|r| r.1.as_str())),
        table::string_col(rows.iter().map(|r| classes.fine[argmax(&r.2)].as_str())),
        table::string_col(rows.iter().map(|r| classes.coarse[argmax(&r.3)].as_str())),
        table::string_col(from_fine.iter().map(|p| classes.coarse[argmax(p)].as_str())),
    ];
    for k in 0..classes.fine.len() {
        cols.push(Arc::new(rows.iter().map(|r| r.2[k]).collect::<Float64Array>()));
    }
    for k in 0..classes.coarse.len() {
        cols.push(Arc::new(rows.iter().map(|r| r.3[k]).collect::<Float64Array>()));
    }
    for k in 0..classes.coarse.len() {
        cols.push(Arc::new(from_fine.iter().map(|p| p[k]).collect::<Float64Array>()));
    }
    let (fine, coarse) = classes.names();
    table::write(out, schemas::tables::new_predictions(&fine, &coarse), cols)?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arrow::array::AsArray;
    use arrow::datatypes::Float64Type;
    use safetensors::tensor::{Dtype, TensorView};
    use schemas::workflow::ModelKind;
    use tch::nn;

    use super::*;
    use crate::hmil::checkpoint::Info;
    use crate::hmil::train::{build_model, model_config};

    fn classes() -> Classes {
        Classes {
            coarse: vec!["benign".into(), "malignant".into()],
            fine: vec!["N".into(), "PB".into(), "IC".into()],
            fine_to_coarse: vec![0, 0, 1],
        }
    }

    /// A directory with two slides' features (dimension 8) and a trained-shape checkpoint, with
    /// or without its metadata.
    fn setup(with_info: bool) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let feats = dir.path().join("features");
        std::fs::create_dir(&feats).unwrap();
        for (slide, n) in [("a", 5usize), ("b", 9)] {
            let bytes: Vec<u8> = (0..n * 8).flat_map(|i| ((i % 7) as f32 * 0.3).to_le_bytes()).collect();
            let view = TensorView::new(Dtype::F32, vec![n, 8], &bytes).unwrap();
            let path = feats.join(format!("{slide}.safetensors"));
            safetensors::tensor::serialize_to_file([("features", view)], &None::<HashMap<String, String>>, &path)
                .unwrap();
        }
        let vs = nn::VarStore::new(Device::Cpu);
        build_model(&vs, &model_config(ModelKind::Hmil, &classes(), 8), 3);
        let ckpt = dir.path().join("model.safetensors");
        if with_info {
            checkpoint::save(&vs, &Info::new(ModelKind::Hmil, &classes(), 8, 0.0), &ckpt).unwrap();
        } else {
            vs.save(&ckpt).unwrap();
        }
        (dir, ckpt)
    }

    #[test]
    fn a_checkpoint_alone_names_its_classes_and_sums_fine_into_coarse() {
        let (dir, ckpt) = setup(true);
        let out = dir.path().join("p.parquet");
        assert_eq!(predict(&ckpt, &dir.path().join("features"), None, &out, Device::Cpu).unwrap(), 2);
        let t = table::read(&out).unwrap();
        let col =
            |n: &str| t.column_by_name(n).unwrap_or_else(|| panic!("no {n}")).as_primitive::<Float64Type>().clone();
        for i in 0..2 {
            let fine = ["N", "PB", "IC"].map(|c| col(&format!("prob_fine_{c}")).value(i));
            let benign = col("prob_coarse_from_fine_benign").value(i);
            let malignant = col("prob_coarse_from_fine_malignant").value(i);
            assert!((benign - (fine[0] + fine[1])).abs() < 1e-9 && (malignant - fine[2]).abs() < 1e-9);
            assert!(benign > 0.0 && malignant > 0.0);
        }
        let from_fine = table::strings(&t, "coarse_from_fine_pred");
        assert!(from_fine.iter().all(|c| c == "benign" || c == "malignant"), "{from_fine:?}");
    }

    #[test]
    fn without_names_it_is_an_error_and_a_mismatch_is_one_too() {
        let (dir, ckpt) = setup(false);
        let out = dir.path().join("p.parquet");
        let err = predict(&ckpt, &dir.path().join("features"), None, &out, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("carries no class names") && err.contains("--workflow"), "{err}");
        assert!(!out.exists(), "nothing is written");
        predict(&ckpt, &dir.path().join("features"), Some(classes()), &out, Device::Cpu).unwrap();

        let (dir, ckpt) = setup(true);
        let mut other = classes();
        other.fine[2] = "DCIS".into();
        let err = predict(&ckpt, &dir.path().join("features"), Some(other), &out, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("\"IC\"") && err.contains("\"DCIS\""), "{err}");
    }
}
