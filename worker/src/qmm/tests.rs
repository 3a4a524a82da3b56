//! The kernels against candle's generic quantized matmul (`k_quants::matmul`: ggml's
//! arithmetic, what `quantized_llama` runs wherever candle does not repack) and against the
//! plain dot products, on odd shapes.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use super::*;

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// candle's generic CPU matmul over the same blocks.
fn reference(q: &QTensor, xs: &[f32], m: usize) -> Vec<f32> {
    use candle_core::quantized::k_quants::{self as kq, *};
    let (n, k) = q.shape().dims2().unwrap();
    let data = q.data().unwrap();
    let mut out = vec![0f32; m * n];
    macro_rules! run {
        ($t:ty) => {
            kq::matmul::<$t>((m, k, n), xs, cast::<$t>(&data).unwrap(), &mut out).unwrap()
        };
    }
    match q.dtype() {
        GgmlDType::Q4_0 => run!(BlockQ4_0),
        GgmlDType::Q4_1 => run!(BlockQ4_1),
        GgmlDType::Q5_0 => run!(BlockQ5_0),
        GgmlDType::Q5_1 => run!(BlockQ5_1),
        GgmlDType::Q8_0 => run!(BlockQ8_0),
        GgmlDType::Q2K => run!(BlockQ2K),
        GgmlDType::Q3K => run!(BlockQ3K),
        GgmlDType::Q4K => run!(BlockQ4K),
        GgmlDType::Q5K => run!(BlockQ5K),
        GgmlDType::Q6K => run!(BlockQ6K),
        d => panic!("{d:?}"),
    }
    out
}

/// A `[rows, cols]` tensor of the workers' deterministic uniform values: the same inputs on
/// every run (a one-output shape drawn afresh could cancel to near zero, where a tolerance
/// relative to the output's scale is ill-posed, and fail one run in a hundred).
fn fixed(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = crate::rng::Rng::new(seed);
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 2.0).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn check(dtype: GgmlDType, shapes: &[(usize, usize, usize)]) {
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        let seed = (dtype as u64) << 32 | i as u64;
        let w = fixed(n, k, seed);
        let x = fixed(m, k, seed ^ 0xA5A5);
        let q = QTensor::quantize(&w, dtype).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let reference = reference(&q, &xs, m);
        let ours = matmul(&q, &xs, m).unwrap().expect("supported");
        let d = max_rel_diff(&ours, &reference);
        assert!(d < 1e-5, "{dtype:?} m={m} n={n} k={k}: differs from candle by {d}");
        let y = forward(&QMatMul::from_qtensor(q).unwrap(), &x.reshape((1, m, k)).unwrap()).unwrap().unwrap();
        assert_eq!(y.dims(), &[1, m, n]);
    }
}

const SHAPES_32: &[(usize, usize, usize)] =
    &[(1, 1, 32), (1, 7, 96), (3, 64, 576), (4, 130, 64), (5, 33, 160), (17, 200, 576), (70, 96, 1536), (1, 1536, 576)];
const SHAPES_K: &[(usize, usize, usize)] = &[(1, 1, 256), (1, 7, 512), (3, 64, 256), (9, 130, 1536), (70, 33, 512)];

#[test]
fn q4_0_matches_candle() {
    check(GgmlDType::Q4_0, SHAPES_32);
}
#[test]
fn q4_1_matches_candle() {
    check(GgmlDType::Q4_1, SHAPES_32);
}
#[test]
fn q5_0_matches_candle() {
    check(GgmlDType::Q5_0, SHAPES_32);
}
#[test]
fn q5_1_matches_candle() {
    check(GgmlDType::Q5_1, SHAPES_32);
}
#[test]
fn q8_0_matches_candle() {
    check(GgmlDType::Q8_0, SHAPES_32);
}
#[test]
fn k_quants_match_candle() {
    for dtype in [GgmlDType::Q2K, GgmlDType::Q3K, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        check(dtype, SHAPES_K);
    }
}

/// The SIMD kernels (AVX2, and AVX-512 VNNI where the CPU has it) and the plain dot
/// products give the same sums (all exact in integers per block; only the float
/// accumulation order differs), on odd block counts and every group size.
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_kernels_equal_the_plain_dot_products() {
    if !avx2::available() {
        return;
    }
    fn one<B: Block>(dtype: GgmlDType, fast: impl Fn() -> Kernels<B>) {
        let dev = Device::Cpu;
        for (m, n, k) in [(7, 37, 320), (9, 5, 96), (1, 3, 32), (6, 11, 576)] {
            let w = QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(), dtype).unwrap();
            let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (m * k,), &dev).unwrap().to_vec1().unwrap();
            let data = w.data().unwrap();
            let fast = blocks32::<B>(&data, n, k, &xs, m, fast()).unwrap();
            let plain = blocks32::<B>(&data, n, k, &xs, m, Kernels::Plain).unwrap();
            let d = max_rel_diff(&fast, &plain);
            assert!(d < 1e-5, "{dtype:?} m={m} n={n} k={k}: {d}");
        }
    }
    one::<Q4_0>(GgmlDType::Q4_0, || Kernels::Avx2(simd!(avx2, q4_0)));
    one::<Q4_1>(GgmlDType::Q4_1, || Kernels::Avx2(simd!(avx2, q4_1)));
    one::<Q5_0>(GgmlDType::Q5_0, || Kernels::Avx2(simd!(avx2, q5_0)));
    one::<Q5_1>(GgmlDType::Q5_1, || Kernels::Avx2(simd!(avx2, q5_1)));
    one::<Q8_0>(GgmlDType::Q8_0, || Kernels::Avx2(simd!(avx2, q8_0)));
    if !avx512::available() {
        eprintln!("no AVX-512 VNNI on this CPU: its kernels are not tested here");
        return;
    }
    one::<Q4_1>(GgmlDType::Q4_1, || Kernels::Avx2(simd!(avx2, q4_1_vnni)));
    one::<Q5_1>(GgmlDType::Q5_1, || Kernels::Avx2(simd!(avx2, q5_1_vnni)));
    one::<Q4_0>(GgmlDType::Q4_0, || Kernels::Avx512(simd!(avx512, q4_0)));
    one::<Q5_0>(GgmlDType::Q5_0, || Kernels::Avx512(simd!(avx512, q5_0)));
    one::<Q8_0>(GgmlDType::Q8_0, || Kernels::Avx512(simd!(avx512, q8_0)));
}

#[test]
fn what_it_does_not_take_is_left_to_candle() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
    let f16 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::F16).unwrap()).unwrap();
    assert!(forward(&f16, &Tensor::zeros((2, 64), candle_core::DType::F32, &dev).unwrap()).unwrap().is_none());
}

/// A row's result is bit for bit the same whatever rows share its matmul (alone, first,
/// last, in a group of two, three or four): what lets a batched request give exactly its solo tokens.
#[test]
fn a_rows_result_does_not_depend_on_its_batch() {
    let dev = Device::Cpu;
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let (n, k) = (37, 512);
        let q = QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(), dtype).unwrap();
        let m = 9;
        let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (m * k,), &dev).unwrap().to_vec1().unwrap();
        let alone: Vec<Vec<f32>> = (0..m).map(|r| matmul(&q, &xs[r * k..(r + 1) * k], 1).unwrap().unwrap()).collect();
        for rows in [2, 3, 4, 5, 6, 7, 9] {
            let got = matmul(&q, &xs[..rows * k], rows).unwrap().unwrap();
            for r in 0..rows {
                assert_eq!(&got[r * n..(r + 1) * n], &alone[r][..], "{dtype:?}: row {r} of {rows}");
            }
        }
    }
}

/// The activations' rounding is `f32::round` (ggml's `roundf`) exactly: halves, values a
/// hair either side of them, the ends of the 8-bit range, signs.
#[test]
fn activation_rounding_is_roundf() {
    let mut vs: Vec<f32> = (-1280..=1280).map(|i| i as f32 / 10.0).collect();
    for h in -128..128 {
        let half = h as f32 + 0.5;
        vs.extend([half, f32::from_bits(half.to_bits() + 1), f32::from_bits(half.to_bits() - 1), -half]);
    }
    vs.extend([0.0, -0.0, 127.0, -127.0, 127.49999, 0.49999997, -0.49999997]);
    for v in vs {
        assert_eq!(super::blocks::round_half_away(v), v.round() as i32, "{v}");
    }
}
