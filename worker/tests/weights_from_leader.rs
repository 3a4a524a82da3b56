//! Weights from one machine, over the in-memory network: ranks other than 0 never see a
//! model path; rank 0 streams them the weights of their ops, they cache them by the
//! checkpoint's content hash, load them from the cache next time, fetch again a file that
//! fails its checksum, and never reuse the cache of another checkpoint. Every run's tokens
//! equal candle-transformers' Mistral over the same files.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use common::*;
use lemur_protocol::blob::{read_blob, Encoding, OpRef};
use lemur_protocol::OpKind;
use lemur_worker::runtime::memnet::MemNet;

const PROMPT: [u32; 5] = [1, 7, 42, 99, 3];

type Files = BTreeMap<(String, String), Vec<u8>>;

/// Every file in the caches of ranks 1 and 2 under `cache`: (checkpoint hash, rank/file) -> bytes.
fn cached(cache: &Path) -> Result<Files> {
    let mut out = BTreeMap::new();
    for rank in 1..3 {
        cached_by(cache, rank, &mut out)?;
    }
    Ok(out)
}

fn cached_by(cache: &Path, rank: u32, out: &mut Files) -> Result<()> {
    let root = cache.join(format!("rank{rank}/weights"));
    if !root.exists() {
        return Ok(());
    }
    for hash in std::fs::read_dir(&root)? {
        let hash = hash?.path();
        let variant = hash.join("f32-as-stored");
        for f in std::fs::read_dir(&variant).with_context(|| format!("{}", variant.display()))? {
            let f = f?.path();
            let name = f.file_name().context("name")?.to_string_lossy().into_owned();
            ensure!(!name.starts_with(".tmp"), "a temporary file was left behind: {}", f.display());
            let hash = hash.file_name().context("hash")?.to_string_lossy().into_owned();
            out.insert((hash, format!("rank{rank}/{name}")), std::fs::read(&f)?);
        }
    }
    Ok(())
}

fn op_of(name: &str) -> Result<OpRef> {
    let name = name.rsplit('/').next().context("a file name")?;
    let stem = name.strip_suffix(".bin").context("a .bin file")?;
    let (kind, layer) = match stem.split_once('.') {
        Some((k, l)) => (k, Some(l.parse()?)),
        None => (stem, None),
    };
    Ok(OpRef { kind: OpKind::parse(kind).context("an op kind")?, layer })
}

/// Checks every cached file against the checkpoint's own tensor, read with candle.
fn check_against(model: &Path, files: &Files, hash: &str) -> Result<usize> {
    let tensors = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu)?;
    let cfg = tiny(2);
    let mut n = 0;
    for ((h, name), bytes) in files.iter().filter(|((h, _), _)| h == hash) {
        let op = op_of(name)?;
        let (meta, at) = read_blob(bytes, op).with_context(|| format!("{h}/{name}"))?;
        ensure!(meta.encoding == Encoding::Dense(lemur_protocol::wire::WireDType::F32), "{name}: {:?}", meta.encoding);
        let hf = lemur_worker::weights::tensor_names(&cfg, false, op.kind, op.layer);
        let want = tensors[&hf[0]].to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let got: Vec<f32> = bytes[at..].chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        ensure!(got == want, "{name} differs from {}", hf[0]);
        n += 1;
    }
    Ok(n)
}

fn chunks_sent(c: &TestCluster, ranks: usize, what: &str) -> usize {
    (1..ranks).map(|r| c.net.sent(&c.addr(0), &c.addr(r), what)).sum()
}

fn run(id: &str, plan: &lemur_protocol::Plan, model: &Path, cache: &Path) -> Result<(Vec<u32>, TestCluster)> {
    let c = TestCluster::start_in(id, plan, infer_job(plan, model, &PROMPT, 8), MemNet::new(), cache, |_| fast());
    let out = c.finish()?;
    Ok((out.tokens, c))
}

#[test]
fn ranks_fetch_their_weights_cache_them_and_fetch_again_only_what_is_corrupt_or_another_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model: PathBuf = common::model(dir.path(), &cfg, 3)?;
    let (want, _) = reference_generate(&model, &PROMPT, 8)?;
    // Three ranks, ops dealt round robin: every rank holds weights of both layers.
    let plan = infer_plan(&cfg, 3, 8, |op| op.id % 3)?;

    // An empty cache: ranks 1 and 2 are sent their weights, and keep them.
    let (tokens, c) = run("fetch-1", &plan, &model, cache.path())?;
    assert_eq!(tokens, want);
    let first = cached(cache.path())?;
    let hashes: Vec<&String> =
        first.keys().map(|(h, _)| h).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(hashes.len(), 1, "{hashes:?}");
    let hash = hashes[0].clone();
    let blobs = chunks_sent(&c, 3, "weight_blob");
    assert_eq!(blobs, first.len(), "one blob per cached file");
    for r in 1..3 {
        let n = first.keys().filter(|(_, f)| f.starts_with(&format!("rank{r}/"))).count();
        assert!(n >= 3, "rank {r} cached only {n} ops' weights");
    }
    assert!(cached_by(cache.path(), 0, &mut Files::new()).is_ok());
    assert!(!cache.path().join("rank0/weights").exists(), "rank 0 reads its own checkpoint");
    assert_eq!(check_against(&model, &first, &hash)?, first.len());

    // The same checkpoint again: nothing is sent, and the files are as they were.
    let (tokens, c) = run("fetch-2", &plan, &model, cache.path())?;
    assert_eq!(tokens, want);
    assert_eq!(chunks_sent(&c, 3, "weight_blob"), 0);
    assert_eq!(chunks_sent(&c, 3, "weight_chunk"), 0);
    assert_eq!(cached(cache.path())?, first);

    // One cached file corrupted (a flipped bit in its data): it alone is fetched again.
    let (victim, name) = first.keys().nth(first.len() / 2).context("a file")?.clone();
    let (rank, file) = name.split_once('/').context("rank/file")?;
    let path = cache.path().join(rank).join("weights").join(&victim).join("f32-as-stored").join(file);
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&path, &bytes)?;
    assert!(read_blob(&bytes, op_of(&name)?).is_err());
    let (tokens, c) = run("fetch-3", &plan, &model, cache.path())?;
    assert_eq!(tokens, want);
    assert_eq!(chunks_sent(&c, 3, "weight_blob"), 1, "only {name} is sent again");
    assert_eq!(cached(cache.path())?, first, "{name} is whole again");

    // Rank 0 restarted with another checkpoint of the same shape: a new hash, new files,
    // and that checkpoint's tokens (the old cache is not reused).
    let dir2 = tempfile::tempdir()?;
    let other = common::model(dir2.path(), &cfg, 4)?;
    let (want2, _) = reference_generate(&other, &PROMPT, 8)?;
    assert_ne!(want2, want, "the two random checkpoints should differ");
    let (tokens, c) = run("fetch-4", &plan, &other, cache.path())?;
    assert_eq!(tokens, want2);
    assert_eq!(chunks_sent(&c, 3, "weight_blob"), first.len());
    let all = cached(cache.path())?;
    let hash2 = all.keys().map(|(h, _)| h.clone()).find(|h| *h != hash).context("a second checkpoint's folder")?;
    assert_eq!(check_against(&other, &all, &hash2)?, first.len());
    Ok(())
}

/// A weight transfer broken in flight fails the set-up with an error that says what broke,
/// within the deadlines, and the next run over the same cache is right.
#[test]
fn a_corrupt_duplicated_lost_or_cut_weight_transfer_fails_the_set_up_by_name() -> Result<()> {
    use lemur_worker::runtime::memnet::{Fault, Rule};
    let dir = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = common::model(dir.path(), &cfg, 3)?;
    let (want, _) = reference_generate(&model, &PROMPT, 8)?;
    let plan = infer_plan(&cfg, 2, 8, |op| op.id % 2)?;
    let a = addrs(&plan);
    for (i, (fault, rank1_says)) in [
        (Fault::Corrupt, "fails its checksum"),
        (Fault::Duplicate, "sent `weight_chunk` instead of the weights of"),
        (Fault::Drop, "sent `weight_blob` in the middle of the weights of"),
        (Fault::Cut, "closed the connection"),
    ]
    .into_iter()
    .enumerate()
    {
        let net = MemNet::new();
        net.add(Rule::on(&a[0], &a[1], "weight_chunk", fault.clone()).after(2));
        let job = infer_job(&plan, &model, &PROMPT, 8);
        let c = TestCluster::start_in(&format!("broken-{i}"), &plan, job, net, cache.path(), |_| fast());
        let e1 = c.failure(1)?;
        assert!(e1.contains("rank 0") && e1.contains(rank1_says), "{fault:?}: rank 1 says: {e1}");
        let e0 = c.failure(0)?;
        assert!(e0.contains("rank 1"), "{fault:?}: rank 0 says: {e0}");
    }
    let (tokens, _) = run("mended", &plan, &model, cache.path())?;
    assert_eq!(tokens, want);
    Ok(())
}
