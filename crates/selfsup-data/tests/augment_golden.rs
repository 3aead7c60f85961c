//! The augmentations against torchvision + PIL, on fixtures made by
//! `scripts/make_augment_fixtures.py` (resize and crop: within one u8 level of PIL, which
//! rounds in fixed point; colour ops: within float rounding of torchvision's tensor ops).

use selfsup_data::augment::{adjust, center_crop_view, grayscale, resize_crop, CropBox, Interpolation};
use serde_json::Value;

fn fixtures() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/augment.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn bytes(v: &Value) -> Vec<u8> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn interp(v: &Value) -> Interpolation {
    match v.as_str().unwrap() {
        "bilinear" => Interpolation::Bilinear,
        "bicubic" => Interpolation::Bicubic,
        other => panic!("{other}"),
    }
}

/// Largest difference in u8 levels between our [0, 1] output and PIL's bytes.
fn max_level_diff(ours: &[f32], want: &[u8]) -> f32 {
    assert_eq!(ours.len(), want.len());
    ours.iter().zip(want).map(|(a, &b)| (a * 255.0 - b as f32).abs()).fold(0.0, f32::max)
}

#[test]
fn resize_and_crop_match_pil() {
    let f = fixtures();
    let (h, w) = (f["height"].as_u64().unwrap() as usize, f["width"].as_u64().unwrap() as usize);
    let mut exact = 0;
    let cases = f["resize"].as_array().unwrap();
    for case in cases {
        let name = case["image"].as_str().unwrap();
        let (img, c) = (bytes(&f[name]), if name == "rgb" { 3 } else { 1 });
        let b: Vec<usize> = case["crop"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let crop = CropBox { top: b[0], left: b[1], height: b[2], width: b[3] };
        let size = case["size"].as_u64().unwrap() as usize;
        let ours = resize_crop(&img, c, h, w, crop, size, false, interp(&case["interp"]));
        let d = max_level_diff(&ours, &bytes(&case["out"]));
        assert!(d <= 1.0, "{name} {} crop {b:?} -> {size}: {d} levels off", case["interp"]);
        exact += (d == 0.0) as usize;
    }
    // Off-by-one levels are PIL's fixed-point rounding; most cases agree exactly.
    assert!(exact * 2 >= cases.len(), "only {exact} of {} resizes are exact", cases.len());
}

#[test]
fn resize_then_center_crop_matches_torchvision() {
    let f = fixtures();
    let (h, w) = (f["height"].as_u64().unwrap() as usize, f["width"].as_u64().unwrap() as usize);
    for case in f["center_crop"].as_array().unwrap() {
        let name = case["image"].as_str().unwrap();
        let (img, c) = (bytes(&f[name]), if name == "rgb" { 3 } else { 1 });
        let (resize, size) = (case["resize"].as_u64().unwrap() as usize, case["size"].as_u64().unwrap() as usize);
        let ours = center_crop_view(&img, (c, h, w), resize, size, interp(&case["interp"]), (&[0.0], &[1.0]));
        let d = max_level_diff(&ours, &bytes(&case["out"]));
        assert!(d <= 1.0, "{name} {} resize {resize} crop {size}: {d} levels off", case["interp"]);
    }
}

#[test]
fn colour_ops_match_torchvision() {
    let f = fixtures();
    let plane = (f["height"].as_u64().unwrap() * f["width"].as_u64().unwrap()) as usize;
    for case in f["ops"].as_array().unwrap() {
        let name = case["image"].as_str().unwrap();
        let c = if name == "rgb" { 3 } else { 1 };
        let mut x: Vec<f32> = bytes(&f[name]).iter().map(|&v| v as f32 / 255.0).collect();
        let factor = case["factor"].as_f64().unwrap() as f32;
        let op = case["op"].as_str().unwrap();
        match op {
            "brightness" => adjust(&mut x, c, plane, 0, factor),
            "contrast" => adjust(&mut x, c, plane, 1, factor),
            "saturation" => adjust(&mut x, c, plane, 2, factor),
            "hue" => adjust(&mut x, c, plane, 3, factor),
            "grayscale" => grayscale(&mut x, plane),
            other => panic!("{other}"),
        }
        let want = floats(&case["out"]);
        let d = x.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d < 1e-5, "{op} {factor} on {name}: max diff {d}");
    }
}

#[test]
fn gaussian_blur_matches_torchvision() {
    let f = fixtures();
    let square = floats(&f["square"]);
    for case in f["blur"].as_array().unwrap() {
        let mut x = square.clone();
        selfsup_data::augment::gaussian_blur(&mut x, 3, 40, case["sigma"].as_f64().unwrap());
        let want = floats(&case["out"]);
        let d = x.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d < 1e-5, "sigma {}: max diff {d}", case["sigma"]);
    }
}
