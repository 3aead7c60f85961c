//! End-to-end tests of the `selfsup` binary: a tiny real run, and one clear error (with a
//! non-zero exit) for each kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use selfsup_data::{dataset, Split};

fn selfsup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_selfsup")).args(args).output().expect("run selfsup")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A synthetic 16x16 MNIST-family directory.
fn data_dir(root: &Path) -> PathBuf {
    let dir = root.join("data");
    std::fs::create_dir_all(&dir).unwrap();
    dataset::write_mnist_family(&dir, Split::Train, &dataset::synthetic_stripes(96, 16, 4, 1)).unwrap();
    dataset::write_mnist_family(&dir, Split::Test, &dataset::synthetic_stripes(40, 16, 4, 2)).unwrap();
    dir
}

fn config(data: &Path, out: &Path) -> String {
    format!(
        r#"seed = 3
epochs = 2
batch_size = 16
output_dir = "{out}"
log_every = 2
[data]
format = "idx"
path = "{data}"
[model]
arch = "resnet18"
in_chans = 1
widths = [4, 8, 8, 8]
[objective.byol]
proj_hidden = 32
proj_dim = 16
[[views]]
size = 16
crop_scale = [0.3, 1.0]
hflip = 0.5
mean = [0.3]
std = [0.3]
[[views]]
size = 16
crop_scale = [0.3, 1.0]
hflip = 0.5
mean = [0.3]
std = [0.3]
[optimizer.adamw]
lr = 1e-3
[checkpoint]
every = 4
"#,
        data = data.display(),
        out = out.display()
    )
}

/// Writes `text` as a config and runs `selfsup pretrain` on it.
fn pretrain(root: &Path, text: &str) -> Output {
    let path = root.join("run.toml");
    std::fs::write(&path, text).unwrap();
    selfsup(&["pretrain", "--config", path.to_str().unwrap()])
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

fn assert_fails_with(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {e}");
    for n in needles {
        assert!(e.contains(n), "stderr does not mention `{n}`: {e}");
    }
}

#[test]
fn pretrain_resume_and_knn_end_to_end() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let out = root.path().join("run");
    let o = pretrain(root.path(), &config(&data, &out));
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("pretrained 12 steps"), "{stdout}");
    assert!(out.join("config.toml").is_file() && out.join("metrics.jsonl").is_file());
    let first_line = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().next().unwrap().to_string();
    for key in ["\"loss\"", "\"lr\"", "\"momentum\"", "\"images_per_sec\"", "\"loss_12\""] {
        assert!(first_line.contains(key), "{first_line}");
    }
    // Resuming a finished run is a no-op that still succeeds.
    let cfg_path = root.path().join("run.toml");
    let o = selfsup(&["pretrain", "--config", cfg_path.to_str().unwrap(), "--resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resumed at step 12 of 12"));

    let o = selfsup(&["eval", "knn", "--checkpoint", out.to_str().unwrap(), "--baselines"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    for row in ["random init", "raw pixels", "pretrained", "k=20 T=0.07", "k=200 T=0.1"] {
        assert!(table.contains(row), "{table}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("knn.json")).unwrap()).unwrap();
    assert_eq!(json["results"].as_array().unwrap().len(), 3);
    assert_eq!(json["unseen_query_classes"], 0);
    // The stripes are easy: raw pixels separate them well above chance (25 %).
    assert!(json["results"][1]["accuracy"][0]["top1"].as_f64().unwrap() > 50.0, "{json}");

    for preset in ["standard", "mae", "care"] {
        let args = ["eval", "linear", "--checkpoint", out.to_str().unwrap(), "--baselines", "--epochs", "5"];
        let o = selfsup(&[&args[..], &["--preset", preset]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let table = String::from_utf8_lossy(&o.stdout);
        assert!(
            table.contains(&format!("linear probe ({preset}, 5 epochs)")) && table.contains("raw pixels"),
            "{table}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("linear.json")).unwrap()).unwrap();
        assert_eq!(json["results"].as_array().unwrap().len(), 3);
        assert!(json["results"][1]["result"]["top1"].as_f64().unwrap() > 50.0, "{json}");
    }
    let o = selfsup(&["eval", "linear", "--checkpoint", out.to_str().unwrap(), "--preset", "svm"]);
    assert_fails_with(&o, &["--preset \"svm\"", "standard, moco, care or mae"]);
    // The grid probe: the 16 px stripes give a 2x2 map at stride 8, so a 2x2 grid fits and a
    // 3x3 one is refused by name.
    let grid_json = root.path().join("grid.json");
    let args = ["eval", "linear", "--checkpoint", out.to_str().unwrap(), "--epochs", "2", "--grid"];
    let o = selfsup(&[&args[..], &["2", "--json", grid_json.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2x2 grid of the final map"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&grid_json).unwrap()).unwrap();
    assert_eq!(json["pooling"], "2x2 grid of the final map");
    let o = selfsup(&[&args[..], &["3"]].concat());
    assert_fails_with(&o, &["3x3 grid does not fit the 2x2 feature map"]);
    let o = selfsup(&[&args[..], &["2", "--weight-decay=-1"]].concat());
    assert_fails_with(&o, &["--weight-decay -1: expected a finite value >= 0"]);
    // A validation split cut from the end of the training split (96 images here).
    let o = selfsup(&[&args[..], &["2", "--holdout", "32", "--json", grid_json.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("64 training images, 32 held-out training images"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&grid_json).unwrap()).unwrap();
    assert_eq!((&json["train"], &json["test"], &json["holdout"]), (&64.into(), &32.into(), &true.into()));
    let o = selfsup(&[&args[..], &["2", "--holdout", "96"]].concat());
    assert_fails_with(&o, &["--holdout 96: expected 1 to 95 (the training split has 96 images)"]);

    let args = ["eval", "finetune", "--checkpoint", out.to_str().unwrap(), "--preset", "fmnist"];
    let o = selfsup(
        &[&args[..], &["--epochs", "4", "--batch", "16", "--blr", "0.2", "--baselines", "--eval-every", "2"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("fine-tuning (fmnist: 4 epochs, batch 16") && table.contains("random init"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("finetune.json")).unwrap()).unwrap();
    assert_eq!(json["results"].as_array().unwrap().len(), 2);
    assert_eq!(json["results"][1]["result"]["test_curve"].as_array().unwrap().len(), 2);
    assert!(json["results"][1]["result"]["top1"].as_f64().unwrap() > 50.0, "{json}");
    // Mixup + CutMix run end to end too.
    let mix_json = root.path().join("mix.json");
    let mix =
        ["--epochs", "2", "--batch", "16", "--mixup", "0.8", "--cutmix", "1.0", "--json", mix_json.to_str().unwrap()];
    let o = selfsup(&[&args[..], &mix].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read_to_string(&mix_json).unwrap().contains("\"mixup\": 0.8"));
    // Fine-tuning scores on a held-out part of the training split the same way as the probe.
    let o = selfsup(&[&args[..], &mix, &["--holdout", "32"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("64 training images, 32 held-out training images"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&mix_json).unwrap()).unwrap();
    assert_eq!((&json["train"], &json["test"], &json["holdout"]), (&64.into(), &32.into(), &true.into()));
    let o = selfsup(&[&args[..], &["--layer-decay", "0"]].concat());
    assert_fails_with(&o, &["layer_decay must lie in (0, 1], got 0"]);

    let o = selfsup(&["report", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = std::fs::read_to_string(out.join("report/summary.md")).unwrap();
    for part in [
        "objective `byol`",
        "### kNN",
        "### Linear probe (care",
        "### Fine-tuning (fmnist, 4 epochs",
        "![loss](loss.png)",
    ] {
        assert!(summary.contains(part), "{part}: {summary}");
    }
    assert!(out.join("report/loss.png").is_file() && out.join("report/schedule.png").is_file());

    // A test class the bank never saw is reported and scored as an error, not a crash.
    dataset::write_mnist_family(&data, Split::Test, &dataset::synthetic_stripes(40, 16, 5, 2)).unwrap();
    let o = selfsup(&["eval", "knn", "--checkpoint", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 test class(es) do not occur in the training split"), "{}", stderr(&o));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("knn.json")).unwrap()).unwrap();
    assert_eq!(json["unseen_query_classes"], 1);
    // Class 4 is 8 of the 40 queries: at most 80 % can be right.
    assert!(json["results"][0]["accuracy"][0]["top1"].as_f64().unwrap() <= 80.0, "{json}");
    let o = selfsup(&["eval", "linear", "--checkpoint", out.to_str().unwrap(), "--epochs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn config_errors_name_the_field() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let good = config(&data, &root.path().join("run"));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (good.replace("batch_size = 16", "batch_size = 16\nbatch_sise = 8"), vec!["batch_sise"]),
        (good.replace("proj_dim = 16", "proj_dimm = 16"), vec!["proj_dimm"]),
        (good.replace("batch_size = 16", "batch_size = 0"), vec!["batch_size must be positive"]),
        (good.replace("lr = 1e-3", "lr = -1e-3"), vec!["optimizer.lr", "-0.001"]),
        // ResNet takes any side; ConvNeXt V2 needs a multiple of its stride.
        (
            good.replace(
                "arch = \"resnet18\"\nin_chans = 1\nwidths = [4, 8, 8, 8]",
                "arch = \"convnextv2_atto\"\nin_chans = 1",
            ),
            vec!["views[0].size = 16", "stride 32"],
        ),
        (good.replace("batch_size = 16", "batch_size = \"big\""), vec!["batch_size"]),
        (good.replace("arch = \"resnet18\"", "arch = \"resnet19\""), vec!["resnet19"]),
        (good.replace("hflip = 0.5", "hflip = 1.5"), vec!["views.hflip", "1.5"]),
    ];
    for (text, needles) in cases {
        assert_fails_with(&pretrain(root.path(), &text), &needles);
    }
    let o = selfsup(&["pretrain", "--config", root.path().join("nope.toml").to_str().unwrap()]);
    assert_fails_with(&o, &["nope.toml"]);
}

#[test]
fn data_errors_name_the_file() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let out = root.path().join("run");
    // Missing dataset directory.
    let missing = root.path().join("no-such-dir");
    assert_fails_with(&pretrain(root.path(), &config(&missing, &out)), &["no-such-dir", "not found"]);
    // Wrong magic: a label file where the images should be.
    let images = data.join("train-images-idx3-ubyte");
    let good_images = std::fs::read(&images).unwrap();
    std::fs::copy(data.join("train-labels-idx1-ubyte"), &images).unwrap();
    assert_fails_with(
        &pretrain(root.path(), &config(&data, &out)),
        &["train-images-idx3-ubyte", "0x00000801", "expected 0x00000803"],
    );
    // Truncated image file.
    std::fs::write(&images, &good_images[..good_images.len() / 2]).unwrap();
    assert_fails_with(&pretrain(root.path(), &config(&data, &out)), &["train-images-idx3-ubyte", "truncated"]);
    // Label count mismatch.
    std::fs::write(&images, &good_images).unwrap();
    let labels = data.join("train-labels-idx1-ubyte");
    selfsup_data::idx::write(&labels, &[5], &[0, 1, 2, 3, 0]).unwrap();
    assert_fails_with(
        &pretrain(root.path(), &config(&data, &out)),
        &["train-labels-idx1-ubyte", "5 labels", "96 images"],
    );
    // A checkpoint path with nothing in it.
    let o = selfsup(&["eval", "knn", "--checkpoint", root.path().to_str().unwrap()]);
    assert_fails_with(&o, &["no checkpoint in"]);
}

#[test]
fn eval_segment_scores_mask_folders() {
    use selfsup_eval::masks::{write_mask_png, Mask};
    let root = tempfile::tempdir().unwrap();
    let (pred, truth) = (root.path().join("pred"), root.path().join("truth"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&truth).unwrap();
    // Target: left half background, right half foreground; the prediction misses one column.
    let target = Mask { width: 4, height: 2, labels: vec![0, 0, 1, 1, 0, 0, 1, 1] };
    let guess = Mask { width: 4, height: 2, labels: vec![0, 0, 0, 1, 0, 0, 0, 1] };
    write_mask_png(&truth.join("x.png"), &target).unwrap();
    write_mask_png(&pred.join("x.png"), &guess).unwrap();
    let args = ["eval", "segment", "--pred", pred.to_str().unwrap(), "--truth", truth.to_str().unwrap()];
    let o = selfsup(&[&args[..], &["--classes", "2", "--names", "background,object"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // background: TP 4, FP 2 -> IoU 66.67; object: TP 2, FN 2 -> IoU 50, Dice 66.67.
    assert!(out.contains("| background   |  66.67 |  80.00 |"), "{out}");
    assert!(out.contains("| object       |  50.00 |  66.67 |"), "{out}");
    assert!(out.contains("pixel accuracy 75.00"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pred.join("segment.json")).unwrap()).unwrap();
    assert!((json["score"]["metrics"]["miou"].as_f64().unwrap() - 58.333).abs() < 1e-2, "{json}");
    let o = selfsup(&[&args[..], &["--classes", "3", "--names", "a,b"]].concat());
    assert_fails_with(&o, &["--names has 2 names for 3 classes"]);
    std::fs::remove_file(pred.join("x.png")).unwrap();
    let o = selfsup(&[&args[..], &["--classes", "2"]].concat());
    assert_fails_with(&o, &["no prediction for 1 of 1 target masks (first: x.png)"]);
}

#[test]
fn data_pack_info_and_training_from_shards() {
    use selfsup_eval::masks::{write_mask_png, Mask};
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let packed = root.path().join("packed");
    let o = selfsup(&["data", "pack", data.to_str().unwrap(), packed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("96 images of 1x16x16, 4 classes") && out.contains("40 images"), "{out}");
    let o = selfsup(&["data", "pack", data.to_str().unwrap(), packed.to_str().unwrap()]);
    assert_fails_with(&o, &["exists; pass --overwrite"]);
    let o = selfsup(&["data", "info", packed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("96 images of 1x16x16") && out.contains("4 classes"), "{out}");

    // Pretraining reads the packed store exactly as it read the IDX files.
    let run = root.path().join("run");
    let text = config(&data, &run)
        .replace("format = \"idx\"", "format = \"shards\"")
        .replace(&format!("path = \"{}\"", data.display()), &format!("path = \"{}\"", packed.display()));
    let o = pretrain(root.path(), &text);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("pretrained 12 steps"));

    // And from an LMDB store of PNG-encoded records, decoded on every read.
    let lmdb_data = root.path().join("packed-lmdb");
    let o = selfsup(&["data", "pack", data.to_str().unwrap(), lmdb_data.to_str().unwrap(), "--to", "lmdb"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run2 = root.path().join("run-lmdb");
    let text = config(&data, &run2)
        .replace("format = \"idx\"", "format = \"lmdb\"")
        .replace(&format!("path = \"{}\"", data.display()), &format!("path = \"{}\"", lmdb_data.display()));
    let o = pretrain(root.path(), &text);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = selfsup(&["eval", "knn", "--checkpoint", run2.to_str().unwrap(), "--baselines"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same images give the same training losses whatever the store.
    let losses = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split("\"loss\":").nth(1).map(|r| r.split(',').next().unwrap().to_string()))
            .collect()
    };
    assert_eq!(losses(&run), losses(&run2));

    // One corrupt record in the training store: skipped, counted in metrics.jsonl, named on
    // stderr; with a zero tolerance the run stops naming it.
    let damaged = root.path().join("damaged");
    {
        use selfsup_data::Source;
        let store = selfsup_data::lmdb::LmdbStore::open(&lmdb_data.join("train")).unwrap();
        let mut w = selfsup_data::lmdb::LmdbWriter::create(&damaged.join("train"), 1, 1 << 20, false).unwrap();
        for i in 0..store.len() {
            let bytes = if i == 5 { b"not a png".to_vec() } else { store.encoded(i).unwrap() };
            w.push(&bytes, store.label(i)).unwrap();
        }
        w.finish(vec![], "test", Default::default()).unwrap();
        copy_dir(&lmdb_data.join("test"), &damaged.join("test"));
    }
    let run3 = root.path().join("run-damaged");
    let text = config(&data, &run3)
        .replace("format = \"idx\"", "format = \"lmdb\"\nmax_bad_fraction = 0.05")
        .replace(&format!("path = \"{}\"", data.display()), &format!("path = \"{}\"", damaged.display()));
    let o = pretrain(root.path(), &text);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 record(s) failed to decode") && stderr(&o).contains("record 5"), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(run3.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().last().unwrap().contains("\"corrupt_records\":1"), "{metrics}");
    let o = pretrain(root.path(), &text.replace("max_bad_fraction = 0.05", "max_bad_fraction = 0.0"));
    assert_fails_with(&o, &["1 of 96 records failed to decode", "record 5"]);

    // An image folder with split sub-folders, one corrupt file.
    let folder = root.path().join("folder");
    for (split, n) in [("train", 4), ("val", 2)] {
        for class in ["a", "b"] {
            let dir = folder.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let mask = Mask { width: 20, height: 12, labels: vec![if class == "a" { 30 } else { 220 }; 240] };
                write_mask_png(&dir.join(format!("{i}.png")), &mask).unwrap();
            }
        }
    }
    std::fs::write(folder.join("train/a/bad.png"), b"\x89PNG\r\n\x1a\nnope").unwrap();
    let out = root.path().join("folder-packed");
    let args = ["data", "pack", folder.to_str().unwrap(), out.to_str().unwrap(), "--channels", "1"];
    let o = selfsup(&args);
    assert_fails_with(&o, &["into shards needs --size"]);
    let o = selfsup(&[&args[..], &["--size", "8", "--max-bad", "0.5"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("8 images of 1x8x8, 2 classes; skipped {\"unreadable or corrupt\": 1}"), "{stdout}");
    assert!(stdout.contains("4 images of 1x8x8, 2 classes; skipped none"), "{stdout}");
    assert!(stderr(&o).contains("bad.png"), "{}", stderr(&o));
    // The same folder into LMDB: original bytes kept, no --size needed.
    let lmdb = root.path().join("folder-lmdb");
    let o = selfsup(&[
        "data",
        "pack",
        folder.to_str().unwrap(),
        lmdb.to_str().unwrap(),
        "--to",
        "lmdb",
        "--max-bad",
        "0.5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("8 encoded images (3 channels when decoded), 2 classes"));
    let o = selfsup(&["data", "info", lmdb.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(info.contains("sizes (w x h): 20x12: 8") && info.contains("unreadable or corrupt"), "{info}");

    let o = selfsup(&["data", "info", folder.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        info.contains("9 image files") && info.contains("<= 32") && info.contains("unreadable headers: 1"),
        "{info}"
    );
}

#[test]
fn info_lists_every_architecture_with_its_cost() {
    let o = selfsup(&["info", "models", "--size", "224"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for row in [
        "| resnet50 (ImageNet stem) | 23.51 | 4.09 | 8.17 |",
        "| convnextv2_atto | 3.39 | 0.55 | 1.09 |",
        "| vit_base_patch16 | 85.80 | 17.56 | 35.13 |",
        "| mf508m | 12.06 | 0.50 | 1.00 |",
    ] {
        assert!(out.contains(row), "{row}: {out}");
    }
    // One row per registered architecture (two per ResNet: both stems), and only models.
    let rows = out.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| model id")).count();
    let resnets = selfsup_models::Arch::ALL.iter().filter(|a| format!("{a:?}").starts_with("Resnet")).count();
    assert_eq!(rows, selfsup_models::Arch::ALL.len() + resnets, "{out}");
    assert!(!out.contains("objectives"), "{out}");

    // The classic U-Net row: milesial/Pytorch-UNet's 31.04 M parameters.
    let o = selfsup(&["info", "segmentation", "--size", "96"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| unet classic [64, 128, 256, 512, 1024] transposed | 31.04 |"), "{out}");

    let o = selfsup(&["info"]);
    let out = String::from_utf8_lossy(&o.stdout);
    for id in ["byol", "fcmae", "moco_v2", "densecl", "lomar", "mae", "care", "sgd", "lars", "adamw"] {
        assert!(out.contains(id), "{id}: {out}");
    }
}

/// `selfsup infer` loads a timm-named state_dict (with its classifier) and reproduces the model's
/// own forward; bad weights and bad inputs are errors that name what is wrong.
#[test]
fn infer_reproduces_the_model_and_names_bad_weights() {
    use candle_core::{DType, Device, Tensor};
    use selfsup_models::{Arch, Mode, ModelConfig, Vars};
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let cfg = ModelConfig { imagenet_stem: true, ..ModelConfig::narrow(Arch::Resnet18, 3, &[4, 8, 8, 8]) };
    let vars = Vars::new(11);
    let model = cfg.build(vars.vb(DType::F32, &dev)).unwrap();
    let mut state: std::collections::HashMap<String, Tensor> = vars.tensors().into_iter().collect();
    state.insert("fc.weight".into(), Tensor::randn(0f32, 1., (5, 8), &dev).unwrap());
    state.insert("fc.bias".into(), Tensor::randn(0f32, 1., 5, &dev).unwrap());
    state.insert("bn1.num_batches_tracked".into(), Tensor::new(&[3i64], &dev).unwrap());
    let xs = Tensor::randn(0f32, 1., (2, 3, 64, 64), &dev).unwrap();
    let p = |n: &str| tmp.path().join(n);
    candle_core::safetensors::save(&state, p("w.safetensors")).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("input".to_string(), xs.clone())]),
        p("in.safetensors"),
    )
    .unwrap();
    let s = |x: &std::path::PathBuf| x.to_str().unwrap().to_string();
    let run = |weights: &str, input: &str, model: &str| {
        selfsup(&[
            "infer",
            "--model",
            model,
            "--widths",
            "4,8,8,8",
            "--weights",
            weights,
            "--input",
            input,
            "--output",
            &s(&p("out.safetensors")),
        ])
    };
    let o = run(&s(&p("w.safetensors")), &s(&p("in.safetensors")), "resnet18");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = candle_core::safetensors::load(p("out.safetensors"), &dev).unwrap();
    let want = model.forward_pooled(&xs, Mode::Eval).unwrap();
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff(&out["features"], &want) < 1e-5);
    let logits = want.matmul(&state["fc.weight"].t().unwrap()).unwrap().broadcast_add(&state["fc.bias"]).unwrap();
    assert!(diff(&out["logits"], &logits) < 1e-4);

    // Extra, missing and mis-shaped tensors are named.
    let mut bad = state.clone();
    bad.insert("layer9.conv.weight".into(), Tensor::zeros(3, DType::F32, &dev).unwrap());
    candle_core::safetensors::save(&bad, p("extra.safetensors")).unwrap();
    let e = stderr(&run(&s(&p("extra.safetensors")), &s(&p("in.safetensors")), "resnet18"));
    assert!(e.contains("extra 1: `layer9.conv.weight`") && e.contains("extra.safetensors"), "{e}");
    let mut bad = state.clone();
    bad.remove("layer1.0.bn1.running_var");
    bad.insert("layer1.0.conv1.weight".into(), Tensor::zeros((4, 4, 1, 1), DType::F32, &dev).unwrap());
    candle_core::safetensors::save(&bad, p("missing.safetensors")).unwrap();
    let e = stderr(&run(&s(&p("missing.safetensors")), &s(&p("in.safetensors")), "resnet18"));
    assert!(
        e.contains("missing 1: `layer1.0.bn1.running_var`") && e.contains("mis-shaped 1: `layer1.0.conv1.weight`"),
        "{e}"
    );
    // An input the model cannot take, and an unknown id.
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "input".to_string(),
            Tensor::zeros((1, 3, 60, 60), DType::F32, &dev).unwrap(),
        )]),
        p("odd.safetensors"),
    )
    .unwrap();
    let e = stderr(&run(&s(&p("w.safetensors")), &s(&p("odd.safetensors")), "convnextv2_atto"));
    assert!(e.contains("60x60 is not a multiple of convnextv2_atto's total stride 32"), "{e}");
    // ResNet's strided layers round up, so it takes that side.
    let o = run(&s(&p("w.safetensors")), &s(&p("odd.safetensors")), "resnet18");
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&run(&s(&p("w.safetensors")), &s(&p("in.safetensors")), "resnet19"));
    assert!(e.contains("`resnet19` is not a registered architecture") && e.contains("convnextv2_atto"), "{e}");
}

/// `selfsup data segset` then `selfsup segment` with each model family, from the command line:
/// the U-Net, and the U-Net decoder over a ResNet encoder given by an `[encoder]` table; the
/// encoder model without an encoder is an error that says what is missing.
#[test]
fn segment_trains_unet_and_encoder_unet_from_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("png");
    std::fs::create_dir_all(&src).unwrap();
    for k in 0..12u32 {
        let mut img = image::RgbaImage::new(40, 40);
        for (x, y, p) in img.enumerate_pixels_mut() {
            let inside = (6..30).contains(&x) && (4..8 + 2 * k).contains(&y);
            *p = if inside { image::Rgba([200, 40, (k * 20) as u8, 255]) } else { image::Rgba([0, 0, 0, 0]) };
        }
        img.save(src.join(format!("{k}.png"))).unwrap();
    }
    let set = root.path().join("set");
    let o = selfsup(&["data", "segset", src.to_str().unwrap(), set.to_str().unwrap(), "--size", "32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let seg = |model: &str, extra: &[&str]| {
        let out = root.path().join(model);
        let mut args = vec!["segment", "--model", model, "--data", set.to_str().unwrap(), "--out"];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(&["--epochs", "1", "--batch", "3"]);
        args.extend_from_slice(extra);
        (selfsup(&args), out)
    };
    let (o, out) = seg("unet", &["--widths", "8,8,16,16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| test |"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("segment.json")).unwrap()).unwrap();
    assert!(report["gmacs"].as_f64().unwrap() > 0.0, "{report}");
    // Five levels with transposed-conv upsampling (the classic U-Net's shape, narrow).
    let (o, out) = seg("unet", &["--widths", "4,8,8,8,8", "--upsample", "transposed"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("segment.json")).unwrap()).unwrap();
    assert_eq!(report["config"]["upsample"], "transposed", "{report}");
    assert_eq!(report["config"]["widths"].as_array().unwrap().len(), 5, "{report}");
    let (o, _) = seg("segnetr", &["--widths", "4,8,8,8,8"]);
    assert_fails_with(&o, &["SegNetr has four levels", "5 values"]);
    let (o, _) = seg("segnetr", &["--upsample", "transposed"]);
    assert_fails_with(&o, &["`upsample` belongs to model unet"]);

    let cfg = root.path().join("enc.toml");
    std::fs::write(&cfg, "[encoder]\narch = \"resnet18\"\nin_chans = 3\nwidths = [4, 8, 8, 8]\n").unwrap();
    let (o, out) = seg("encoder_unet", &["--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("overlays.png").is_file());
    let (o, _) = seg("encoder_unet", &[]);
    assert_fails_with(&o, &["encoder_unet needs exactly one of `encoder`"]);
}
