//! From slides through the `hmil-flow` binary: synthetic slides are tiled, encoded by a
//! TorchScript encoder made by real PyTorch, and trained on; a second run is all cached; a new
//! slide is the only one tiled and encoded; bad slides and bad encoders are errors naming them.
//! Skipped, with a message, where libopenslide cannot be loaded.

use std::fs;
use std::path::{Path, PathBuf};

mod common;
use common::{executed, hmil_flow, hmil_flow_fails, run};

macro_rules! needs_openslide {
    () => {
        if !wsi::openslide::available() {
            eprintln!("skipped: libopenslide is not available here (run `. scripts/env.sh`)");
            return;
        }
    };
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Synthetic slides (`per_class` × 4) in `dir/data`, and a workflow over them.
fn setup(dir: &Path, scale: &str) -> PathBuf {
    let data = dir.join("data");
    hmil_flow(&["synth", "--slides", data.to_str().unwrap(), "--scale", scale, "--seed", "3"]);
    let wf = dir.join("wf.toml");
    let encoder = repo("workflows/encoders/colour-texture.ts");
    fs::write(
        &wf,
        format!(
            r#"
[workflow]
name = "slides"
seed = 1
[dataset]
labels = "data/labels.csv"
[slides]
dir = "data/slides"
mpp = 1.0
patch_size = 64
[slides.tissue]
min_area = 0.5
[encoder]
model = "{}"
input_size = 64
batch_size = 16
device = "cpu"
[labels.hierarchy]
benign = ["normal", "hyperplasia"]
malignant = ["in_situ", "invasive"]
[splits]
folds = 3
val_frac = 0.2
[train]
epochs = 3
batch_size = 4
device = "cpu"
"#,
            encoder.display()
        ),
    )
    .unwrap();
    wf
}

fn items(dir: &Path) -> usize {
    fs::read_dir(dir.join(".hmil-flow/items")).map_or(0, |d| d.count())
}

#[test]
fn slides_become_results_and_a_new_slide_is_the_only_one_tiled_and_encoded() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), "0.5");
    let wf_s = wf.to_str().unwrap();
    let first = run(&wf, &[]);
    assert!(first.values().all(|s| s == "executed"), "{first:?}");
    assert_eq!(items(dir.path()), 4 * 12, "a tiling, a feature file, its packed rows and a thumbnail per slide");
    let results = dir.path().join("results/slides");
    assert!(results.join("slides/qc/slide_001.png").is_file());
    let h5 = fs::read(results.join("slides/h5/slide_001.h5")).unwrap();
    let tiles = hmil_flow(&["query", wf_s, "SELECT count(*) AS n FROM tiles WHERE current AND slide_id = 'slide_001'"]);
    let n: usize = tiles.lines().find_map(|l| l.trim().trim_matches('|').trim().parse().ok()).unwrap();
    assert!(n > 5, "slide_001 has {n} patches on tissue:\n{tiles}");
    // CLAM's layout: features (N, 24) float32, coords (N, 2) int64.
    let file = hdf5_rows(&h5);
    assert_eq!(file, (n, 24));
    assert!(results.join("report.md").is_file());
    // A heatmap per slide, drawn in the fold that tests it, and every instance's attention for
    // the 2 + 4 classes.
    let pngs: usize = (0..3).map(|k| fs::read_dir(results.join(format!("folds/{k}/heatmaps"))).unwrap().count()).sum();
    assert_eq!(pngs, 12);
    let per_slide = hmil_flow(&[
        "query",
        wf_s,
        "SELECT count(*) AS n FROM instance_attention WHERE current AND slide_id = 'slide_001'",
        "--format",
        "csv",
    ]);
    assert_eq!(per_slide, format!("n\n{}\n", n * 6));
    // The packed store knows where the patches are: level-0 pixels, 128 of them a side.
    let geometry = hmil_flow(&[
        "query",
        wf_s,
        "SELECT DISTINCT coord_unit, patch_size FROM packed WHERE current",
        "--format",
        "csv",
    ]);
    assert!(geometry.contains("px,128.0"), "{geometry}");

    assert!(executed(&run(&wf, &[])).is_empty(), "a second run reuses everything");

    // One more slide: it is the only one tiled and encoded.
    let extra = dir.path().join("extra");
    hmil_flow(&["synth", "--slides", extra.to_str().unwrap(), "--scale", "0.2", "--seed", "9"]);
    fs::copy(extra.join("slides/slide_002.tif"), dir.path().join("data/slides/slide_new.tif")).unwrap();
    let labels = dir.path().join("data/labels.csv");
    let mut csv = fs::read_to_string(&labels).unwrap();
    csv.push_str("case_new,slide_new,hyperplasia\n");
    fs::write(&labels, csv).unwrap();
    let status = hmil_flow(&["status", wf_s]);
    assert!(status.contains("1 of 13 slide(s) to tile (12 tiled already with these settings)"), "{status}");
    assert!(status.contains("1 of 13 slide(s) to read (12 read already)"), "thumbnails: {status}");
    let out = hmil_flow(&["run", wf_s, "tile_slides"]);
    assert!(out.contains("tiled 1 of 13 slide(s)"), "{out}");
    let status = hmil_flow(&["status", wf_s]);
    assert!(status.contains("1 of 13 slide(s) to encode"), "{status}");
    let summary = dir.path().join("summary.json");
    let out = hmil_flow(&["run", wf_s, "--summary-json", summary.to_str().unwrap()]);
    assert!(out.contains("encoded 1 of 13 slide(s)"), "{out}");
    assert_eq!(items(dir.path()), 4 * 13);
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&summary).unwrap()).unwrap();
    let status = |id: &str| json["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap()["status"].clone();
    assert_eq!(status("tile_slides"), "cached", "tiled by the run of its target above");
    assert_eq!(status("extract_features"), "executed");

    // A label change re-tiles and re-encodes nothing.
    let csv = fs::read_to_string(&labels).unwrap().replace("slide_new,hyperplasia", "slide_new,normal");
    fs::write(&labels, csv).unwrap();
    let again = run(&wf, &[]);
    assert_eq!((again["tile_slides"].as_str(), again["extract_features"].as_str()), ("cached", "cached"));
    assert_eq!(again["join_labels"], "executed");

    // Another encoder, or other tiling settings, redo every slide.
    let other = repo("tests/fixtures/encoders/wrong_shape.ts");
    let status = hmil_flow(&["status", wf_s, "--set", &format!("encoder.model=\"{}\"", other.display())]);
    assert!(status.contains("13 of 13 slide(s) to encode (0 encoded already"), "{status}");
    let status = hmil_flow(&["status", wf_s, "--set", "slides.tissue.threshold=20"]);
    assert!(status.contains("13 of 13 slide(s) to tile (0 tiled already"), "{status}");
}

/// (rows, columns) of the `features` dataset of a CLAM `.h5`, read with the project's reader.
fn hdf5_rows(bytes: &[u8]) -> (usize, usize) {
    let text = String::from_utf8_lossy(bytes);
    assert!(text.contains("patch_level") && text.contains("patch_size_level0"), "coords carry CLAM's attributes");
    let arrays = stages::features::parse(stages::features::Format::H5, bytes).unwrap();
    let coords = arrays.coords.expect("coords");
    assert_eq!((coords.rows, coords.cols, coords.dtype.name()), (arrays.features.rows, 2, "int64"));
    (arrays.features.rows, arrays.features.cols)
}

#[test]
fn bad_slides_and_bad_encoders_are_errors_naming_them() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), "0.25");
    let wf_s = wf.to_str().unwrap();
    let slides = dir.path().join("data/slides");
    fs::write(slides.join("notes.svs"), "these are notes, not a slide").unwrap();
    let whole = fs::read(slides.join("slide_001.tif")).unwrap();
    fs::write(slides.join("cut.tif"), &whole[..whole.len() * 6 / 10]).unwrap();
    let (_, err) = hmil_flow_fails(&["run", wf_s, "extract_features"]);
    assert!(err.contains("notes.svs") && err.contains("on_bad_slide = \"skip\""), "{err}");
    assert!(err.contains("cut.tif"), "{err}");
    assert!(!dir.path().join("results/slides/slides").exists(), "nothing of a failed tiling is published");

    let skip = "slides.on_bad_slide=\"skip\"";
    let out = hmil_flow(&["run", wf_s, "extract_features", "--set", skip]);
    assert!(out.contains("skipped 2 slide(s)") || out.contains("could not be read"), "{out}");
    let skipped =
        hmil_flow(&["query", wf_s, "SELECT path FROM skipped WHERE current AND node = 'tile_slides'", "--set", skip]);
    assert!(skipped.contains("notes.svs"), "{skipped}");
    fs::remove_file(slides.join("notes.svs")).unwrap();
    fs::remove_file(slides.join("cut.tif")).unwrap();

    // A slide that says nothing of its resolution.
    let image =
        image::RgbImage::from_fn(1024, 768, |x, _| image::Rgb(if x < 600 { [200, 110, 170] } else { [247, 247, 245] }));
    wsi::tiff::write_pyramid(&slides.join("bare.tif"), &image, None, 256, 2).unwrap();
    let (_, err) = hmil_flow_fails(&["run", wf_s, "tile_slides"]);
    assert!(err.contains("bare.tif") && err.contains("mpp_fallback"), "{err}");
    hmil_flow(&["run", wf_s, "tile_slides", "--set", "slides.mpp_fallback=0.5"]);
    fs::remove_file(slides.join("bare.tif")).unwrap();

    // Encoders that are not TorchScript, or whose output is not one vector per patch.
    let staging = dir.path().join(".hmil-flow/staging");
    for (file, says) in [("not_torchscript.pt", "not a TorchScript file"), ("wrong_shape.ts", "expected (")] {
        let model = repo("tests/fixtures/encoders").join(file);
        let set = format!("encoder.model=\"{}\"", model.display());
        let (_, err) = hmil_flow_fails(&["run", wf_s, "extract_features", "--set", &set]);
        assert!(err.contains(file) && err.contains(says), "{err}");
        assert_eq!(fs::read_dir(&staging).unwrap().count(), 0, "nothing half-written is left");
    }
}

/// Feature files the workspace holds (items with a recorded dimension).
fn encoded_items(dir: &Path) -> usize {
    fs::read_dir(dir.join(".hmil-flow/items"))
        .map_or(0, |d| d.flatten().filter(|e| e.path().join("dim").is_file()).count())
}

#[test]
fn a_run_killed_mid_cohort_keeps_the_slides_it_encoded() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), "0.5");
    let wf_s = wf.to_str().unwrap();
    hmil_flow(&["run", wf_s, "tile_slides"]);
    // Large inputs, one patch a batch: slow enough to be killed part-way.
    let slow = ["--set", "encoder.input_size=512", "--set", "encoder.batch_size=1"];
    let mut args = vec!["run", wf_s, "extract_features"];
    args.extend(slow);
    let quiet = || std::process::Stdio::null();
    let mut child =
        std::process::Command::new(common::BIN).args(&args).stdout(quiet()).stderr(quiet()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while encoded_items(dir.path()) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = encoded_items(dir.path());
    assert!((1..12).contains(&kept), "killed with {kept} of 12 slides encoded");
    let out = hmil_flow(&args);
    assert!(out.contains(&format!("encoded {} of 12 slide(s)", 12 - kept)), "kept {kept}:\n{out}");
    assert_eq!(encoded_items(dir.path()), 12);
}

#[test]
fn init_drafts_a_slides_workflow_that_loads() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "0.25");
    let (slides, labels, out) =
        (dir.path().join("data/slides"), dir.path().join("data/labels.csv"), dir.path().join("init.toml"));
    let encoder = repo("workflows/encoders/colour-texture.ts");
    let said = hmil_flow(&[
        "init",
        "--slides",
        slides.to_str().unwrap(),
        "--encoder",
        encoder.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--hierarchy",
        "benign=normal,hyperplasia;malignant=in_situ,invasive",
    ]);
    assert!(said.contains("slides: 8 tif file(s); the first at 0.500 µm per pixel"), "{said}");
    let dag = hmil_flow(&["dag", out.to_str().unwrap()]);
    assert!(dag.contains("tile_slides") && dag.contains("extract_features"), "{dag}");
}

/// Rows of a CSV `hmil-flow query` printed, by column name.
fn csv_rows(text: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap_or_default().split(',').map(String::from).collect();
    lines.map(|l| header.iter().cloned().zip(l.split(',').map(String::from)).collect()).collect()
}

#[test]
fn heatmaps_find_the_lesion_that_carries_the_class() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), "1");
    let wf_s = wf.to_str().unwrap();
    let train = ["--set", "train.epochs=60", "--set", "train.lr=2e-3", "--set", "train.batch_size=8"];
    let first = run(&wf, &train);
    assert!(first.values().all(|s| s == "executed"), "{first:?}");
    let lesions = stages::synth_slides::read_lesions(&dir.path().join("data/lesions.csv")).unwrap();
    let query = |sql: &str| {
        let mut args = vec!["query", wf_s, sql, "--format", "csv"];
        args.extend(train);
        csv_rows(&hmil_flow(&args))
    };
    // Every test slide's instances for its true fine class, with where they are.
    let rows = query(
        "SELECT i.fold, i.slide_id, i.class, i.x, i.y, i.attention, i.evidence, i.evidence_percentile \
         FROM instance_attention i JOIN labels l ON i.slide_id = l.slide_id AND i.class = l.fine_label \
         WHERE i.current AND l.current ORDER BY i.slide_id, i.instance",
    );
    let mut slides: std::collections::BTreeMap<String, Vec<&std::collections::HashMap<String, String>>> =
        std::collections::BTreeMap::new();
    for r in &rows {
        slides.entry(r["slide_id"].clone()).or_default().push(r);
    }
    assert_eq!(slides.len(), 24, "every slide is tested in one fold");
    let size = 128.0;
    let in_lesion = |slide: &str, x: f64, y: f64| lesions[slide].contains(x + size / 2.0, y + size / 2.0);
    let f = |r: &std::collections::HashMap<String, String>, c: &str| r[c].parse::<f64>().unwrap();
    let (mut top_evidence, mut top_attention, mut chance, mut hot_share) = (0.0, 0.0, 0.0, 0.0);
    for (slide, rs) in &slides {
        // The 8 top tiles of the true class (as the mosaic shows them), by evidence and by attention.
        let top_share = |column: &str| {
            let values: Vec<f64> = rs.iter().map(|r| f(r, column)).collect();
            let (top, _) = stages::hmil::heatmaps::mosaic::chosen(&values, 8);
            top.iter().filter(|&&i| in_lesion(slide, f(rs[i], "x"), f(rs[i], "y"))).count() as f64 / top.len() as f64
        };
        top_evidence += top_share("evidence");
        top_attention += top_share("attention");
        chance += rs.iter().filter(|r| in_lesion(slide, f(r, "x"), f(r, "y"))).count() as f64 / rs.len() as f64;

        // The rendered heatmap: the true class's panel (after the 2 coarse ones), its pixels in
        // the yellow end of the colour map, and how many of them lie in the lesion.
        let fold = &rs[0]["fold"];
        let png = dir.path().join(format!("results/slides/folds/{fold}/heatmaps/{slide}.png"));
        let picture = image::open(&png).unwrap().to_rgb8();
        let fine = ["normal", "hyperplasia", "in_situ", "invasive"].iter().position(|c| *c == rs[0]["class"]).unwrap();
        let corners: Vec<(f64, f64)> = rs.iter().map(|r| (f(r, "x"), f(r, "y"))).collect();
        let placement = stages::hmil::heatmaps::maps::Placement { corners, size };
        let layout = stages::hmil::heatmaps::draw::Layout::new(&placement, 6);
        let (mut hot, mut hot_inside) = (0usize, 0usize);
        for py in 0..layout.height {
            for px in 0..layout.width {
                let (x, y) = (
                    layout.origin.0 + (f64::from(px) + 0.5) * layout.scale,
                    layout.origin.1 + (f64::from(py) + 0.5) * layout.scale,
                );
                let (cx, cy) = layout.pixel(2 + fine, x, y).unwrap();
                let [r, g, b] = picture.get_pixel(cx, cy).0;
                if r > 200 && g > 170 && b < 120 {
                    hot += 1;
                    hot_inside += usize::from(lesions[slide.as_str()].contains(x, y));
                }
            }
        }
        assert!(hot > 0, "{slide}: no hot pixels in the {} panel", rs[0]["class"]);
        hot_share += hot_inside as f64 / hot as f64;
    }
    let n = slides.len() as f64;
    let (top_evidence, top_attention, chance, hot_share) =
        (top_evidence / n, top_attention / n, chance / n, hot_share / n);
    eprintln!(
        "true fine class, mean over 24 test slides: top 8 tiles in the lesion by evidence {top_evidence:.3}, \
         by attention {top_attention:.3}; hot heatmap pixels in the lesion {hot_share:.3}; lesion share of patches {chance:.3}"
    );
    assert!(
        top_evidence >= 0.6 && top_evidence >= 3.0 * chance,
        "top tiles in the lesion: {top_evidence:.3} (chance {chance:.3})"
    );
    assert!(
        hot_share >= 0.5 && hot_share >= 2.5 * chance,
        "hot pixels in the lesion: {hot_share:.3} (chance {chance:.3})"
    );

    // Each slide drawn on the slide, with its mosaic; the report links each class's best and
    // worst predicted slide.
    let drawn = query("SELECT background, top_tiles FROM heatmaps WHERE current");
    assert_eq!(drawn.len(), 24);
    assert!(drawn.iter().all(|r| r["background"] == "slide" && r["top_tiles"].starts_with("top_tiles/")), "{drawn:?}");
    let results = dir.path().join("results/slides");
    let mosaic = image::open(
        results
            .join("folds/0/top_tiles")
            .join(fs::read_dir(results.join("folds/0/top_tiles")).unwrap().next().unwrap().unwrap().file_name()),
    )
    .unwrap();
    assert!(
        mosaic.height() > 6 * stages::hmil::heatmaps::mosaic::TILE
            && mosaic.width() > 16 * stages::hmil::heatmaps::mosaic::TILE
    );
    let report = fs::read_to_string(results.join("report.md")).unwrap();
    let links = report.matches("](folds/").count();
    assert!(links >= 2 * 3 * 6, "a heatmap and its top tiles per class and fold, best and worst:\n{report}");
    assert!(results.join("slides/thumbnails/slide_001.png").is_file());

    // The same checkpoint outside the workflow: one slide's features and the slide, with its
    // heatmap at level 1 of the slide as a pyramidal TIFF.
    let out = dir.path().join("new");
    let (checkpoint, features) = (results.join("folds/0/model.safetensors"), results.join("slides/h5/slide_001.h5"));
    let slide_dir = dir.path().join("data/slides");
    let heatmap = |class: &'static str| {
        let paths = [&checkpoint, &features, &slide_dir, &out].map(|p| p.to_str().unwrap().to_owned());
        let args = ["heatmap", "--checkpoint", &paths[0], "--features", &paths[1], "--slides", &paths[2]];
        let args = args.into_iter().chain(["--out", &paths[3], "--full-res", "1", "--class", class, "--device", "cpu"]);
        args.map(String::from).collect::<Vec<String>>()
    };
    let said = hmil_flow(&heatmap("invasive").iter().map(String::as_str).collect::<Vec<_>>());
    assert!(said.contains("drew 1 slide(s)") && said.contains("slide_001.invasive.level1.tif"), "{said}");
    assert!(out.join("heatmaps/slide_001.png").is_file() && out.join("top_tiles/slide_001.png").is_file());
    let tif = wsi::Slide::open(&out.join("full_res/slide_001.invasive.level1.tif")).unwrap();
    let source = wsi::Slide::open(&dir.path().join("data/slides/slide_001.tif")).unwrap();
    let level1 = source.levels()[1];
    assert_eq!((tif.levels()[0].width, tif.levels()[0].height), (level1.width, level1.height));
    assert!((tif.mpp().unwrap() - 1.0).abs() < 1e-3, "level 1 of a 0.5 µm slide: {:?}", tif.mpp());
    // Coloured where the patches are, the slide itself elsewhere (the TIFF's pixels are level 1's:
    // half the slide's level-0 coordinates).
    let patch = rows.iter().find(|r| r["slide_id"] == "slide_001").unwrap();
    let (x, y) = ((f(patch, "x") + 64.0) as i64, (f(patch, "y") + 64.0) as i64);
    let (over, under) = (tif.read_rgb(x / 2, y / 2, 0, 1, 1).unwrap(), source.read_rgb(x, y, 1, 1, 1).unwrap());
    assert_ne!(over.get_pixel(0, 0), under.get_pixel(0, 0), "a patch is coloured");
    let (corner, slide_corner) = (tif.read_rgb(0, 0, 0, 1, 1).unwrap(), source.read_rgb(0, 0, 1, 1, 1).unwrap());
    assert_eq!(corner.get_pixel(0, 0), slide_corner.get_pixel(0, 0), "glass without patches is the slide's");
    let (_, err) = hmil_flow_fails(&heatmap("ADH").iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("--class ADH") && err.contains("invasive"), "{err}");

    // A workflow from those features (CLAM h5): with the slides named, its heatmaps are drawn
    // on them with mosaics; without, on a blank canvas.
    let features = dir.path().join("features.toml");
    let text = fs::read_to_string(&wf).unwrap().replace("[slides]", "[old_slides]");
    let text =
        text[..text.find("[old_slides]").unwrap()].to_owned() + &text[text.find("[labels.hierarchy]").unwrap()..];
    let text = text
        .replace(
            "labels = \"data/labels.csv\"",
            "labels = \"data/labels.csv\"\nfeatures = \"results/slides/slides/h5\"",
        )
        .replace("name = \"slides\"", "name = \"features\"");
    fs::write(&features, format!("{text}\n[heatmaps]\nslides = \"data/slides\"\ntop_tiles = 2\n")).unwrap();
    let ft = features.to_str().unwrap();
    let drawn_after_a_run = || {
        hmil_flow(&["run", ft]);
        let sql = "SELECT background, top_tiles FROM heatmaps WHERE current";
        csv_rows(&hmil_flow(&["query", ft, sql, "--format", "csv"]))
    };
    let drawn = drawn_after_a_run();
    assert_eq!(drawn.len(), 24);
    assert!(drawn.iter().all(|r| r["background"] == "slide" && !r["top_tiles"].is_empty()), "{drawn:?}");
    let (_, err) = hmil_flow_fails(&["run", ft, "--set", "heatmaps.slides=\"nowhere\""]);
    assert!(err.contains("heatmaps.slides") && err.contains("nowhere"), "{err}");
    fs::write(&features, format!("{text}\n")).unwrap();
    let drawn = drawn_after_a_run();
    assert_eq!(drawn.len(), 24);
    assert!(drawn.iter().all(|r| r["background"] == "blank" && r["top_tiles"].is_empty()), "{drawn:?}");
}
