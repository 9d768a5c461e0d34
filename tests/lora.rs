//! LoRA against PEFT: adapters made by PEFT score the same here, adapters we write load in
//! PEFT with the same result, merging equals applying, and only A/B ever train.

mod common;

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use phitune_model::io::adapter::{Adapter, LoraWeights, module_path};
use phitune_model::lora::LoraConfig;
use phitune_model::phi::ids_tensor;
use phitune_model::{Checkpoint, Phi, PhiTokenizer};

type B = NdArray<f32>;

fn load(name: &str) -> (Phi<B>, PhiTokenizer) {
    let dir = common::fixtures().join(name);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = PhiTokenizer::from_dir(&dir, ckpt.config()).unwrap();
    (Phi::load(&ckpt, &Default::default()).unwrap(), tok)
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_nll_close(model: &Phi<B>, tok: &PhiTokenizer, cases: &serde_json::Value, what: &str) {
    let device = Default::default();
    for case in cases.as_array().unwrap() {
        let tokens = tok.encode(case["text"].as_str().unwrap()).unwrap();
        let nll = model.token_nll(&tokens, &device);
        let want = f64s(&case["nll"]);
        assert_eq!(nll.len(), want.len());
        for (i, (g, w)) in nll.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() < 1e-3,
                "{what}: token {i}: {g} vs PEFT {w}"
            );
        }
    }
}

fn all_nll(model: &Phi<B>, tok: &PhiTokenizer) -> Vec<f32> {
    let exp = common::expected();
    exp["tiny-phi"]["score"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            model.token_nll(
                &tok.encode(c["text"].as_str().unwrap()).unwrap(),
                &Default::default(),
            )
        })
        .collect()
}

#[test]
fn peft_adapters_score_like_peft() {
    let exp = common::expected();
    for name in ["peft-qkvd-r4", "peft-all-r8"] {
        let entry = &exp["adapters"][name];
        let adapter =
            Adapter::read(&common::fixtures().join(entry["dir"].as_str().unwrap())).unwrap();
        let (model, tok) = load("tiny-phi");
        let model = model.with_adapter(&adapter, &Default::default()).unwrap();
        assert_nll_close(&model, &tok, &entry["score"], name);
    }
    // rank_pattern / alpha_pattern / rslora were honoured.
    let a = Adapter::read(&common::fixtures().join("adapters/peft-all-r8")).unwrap();
    let fc2 = &a.modules[&module_path(0, "fc2")];
    assert_eq!(fc2.r, 2);
    assert!((a.modules[&module_path(1, "fc1")].scaling - 32.0 / 8f64.sqrt()).abs() < 1e-12);
    assert!((fc2.scaling - 8.0 / 2f64.sqrt()).abs() < 1e-12);
}

#[test]
fn fresh_lora_leaves_the_model_unchanged() {
    let (model, tok) = load("tiny-phi");
    let before = all_nll(&model, &tok);
    let mut config = LoraConfig::seed();
    config.target_modules = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
        .map(String::from)
        .to_vec();
    let model = model.with_lora(&config, 7, &Default::default());
    assert_eq!(
        model
            .projections()
            .iter()
            .filter(|p| p.2.lora.is_some())
            .count(),
        12
    );
    assert_eq!(
        all_nll(&model, &tok),
        before,
        "B = 0 must make the adapter an exact no-op"
    );
}

#[test]
fn written_adapter_reads_back_identically() {
    let (model, tok) = load("tiny-phi");
    let peft = Adapter::read(&common::fixtures().join("adapters/peft-all-r8")).unwrap();
    let model = model.with_adapter(&peft, &Default::default()).unwrap();
    let before = all_nll(&model, &tok);
    let out = common::scratch("lora-roundtrip");
    let written = model.adapter(&peft.config, Some("tiny-phi".into()));
    written.write(&out).unwrap();
    let back = Adapter::read(&out).unwrap();
    assert_eq!(back, written);
    let (model2, _) = load("tiny-phi");
    let model2 = model2.with_adapter(&back, &Default::default()).unwrap();
    assert_eq!(all_nll(&model2, &tok), before);
}

/// A deterministic adapter with non-zero B, built and written by our code.
fn ours_adapter() -> Adapter {
    let (model, _) = load("tiny-phi");
    let mut adapter = model
        .with_lora(&LoraConfig::seed(), 7, &Default::default())
        .adapter(&LoraConfig::seed(), Some("tiny-phi".into()));
    let mut state = 0x2545f4914f6cdd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    for w in adapter.modules.values_mut() {
        let bound = 1.0 / (w.d_in as f64).sqrt();
        w.a = (0..w.a.len()).map(|_| (next() * bound) as f32).collect();
        w.b = (0..w.b.len()).map(|_| (next() * 0.02) as f32).collect();
    }
    adapter
}

const OURS: &str = "adapters/ours-qkvd-r4";

/// Regenerates the committed adapter written by our writer (then run
/// `make_fixtures.py --adapters-only` to record PEFT's numbers for it).
#[test]
#[ignore]
fn regenerate_ours_fixture() {
    let dir = common::fixtures().join(OURS);
    let _ = std::fs::remove_dir_all(&dir);
    ours_adapter().write(&dir).unwrap();
}

#[test]
fn peft_loads_our_adapter_with_the_same_result() {
    // Our writer still produces exactly the committed files...
    let out = common::scratch("ours-adapter");
    ours_adapter().write(&out).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let committed = std::fs::read(common::fixtures().join(OURS).join(f)).unwrap();
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            committed,
            "{f} differs from the committed one"
        );
    }
    // ...which PEFT loaded (make_fixtures.py) and scored; we get the same numbers.
    let exp = common::expected();
    let entry = &exp["adapters"]["ours-qkvd-r4"];
    assert!(
        entry["base_nll_delta_max"].as_f64().unwrap() > 0.01,
        "the adapter must change the model"
    );
    let (model, tok) = load("tiny-phi");
    let model = model
        .with_adapter(&Adapter::read(&out).unwrap(), &Default::default())
        .unwrap();
    assert_nll_close(&model, &tok, &entry["score"], "ours");
}

fn merged_nll(adapter_dir: &Path, out_name: &str, extra: &[&str]) -> (Vec<f32>, Vec<f32>) {
    let out = common::scratch(out_name).join("merged");
    let tiny = common::fixtures().join("tiny-phi").display().to_string();
    let mut args = vec![
        "merge",
        "--model",
        &tiny,
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = common::phitune(&args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (base, tok) = load("tiny-phi");
    let adapted = base
        .with_adapter(&Adapter::read(adapter_dir).unwrap(), &Default::default())
        .unwrap();
    let ckpt = Checkpoint::open(&out).unwrap();
    let merged: Phi<B> = Phi::load(&ckpt, &Default::default()).unwrap();
    (all_nll(&merged, &tok), all_nll(&adapted, &tok))
}

#[test]
fn merged_checkpoint_equals_adapter_on_base() {
    let dir = common::fixtures().join("adapters/peft-all-r8");
    // Full precision: equal up to f32 rounding of W + BA.
    let (merged, adapted) = merged_nll(&dir, "merge-f32", &["--dtype", "f32"]);
    for (m, a) in merged.iter().zip(&adapted) {
        assert!((m - a).abs() < 1e-4, "{m} vs {a}");
    }
    // Default: the base's fp16, sharded like the input when over the size limit.
    let (merged, adapted) = merged_nll(&dir, "merge-f16", &["--max-shard-mb", "1"]);
    let out = common::scratch("merge-f16-check");
    let _ = out;
    let max = merged
        .iter()
        .zip(&adapted)
        .map(|(m, a)| (m - a).abs())
        .fold(0f32, f32::max);
    assert!(
        max < 5e-3,
        "fp16 merge differs by {max} (fp16 rounding of the merged weights)"
    );
}

#[test]
fn merge_refuses_to_overwrite_and_bad_adapters() {
    let tiny = common::fixtures().join("tiny-phi").display().to_string();
    let adapter = common::fixtures()
        .join("adapters/peft-qkvd-r4")
        .display()
        .to_string();
    let out = common::scratch("merge-nonempty");
    std::fs::write(out.join("keep.txt"), "user data").unwrap();
    let o = common::phitune(&[
        "merge",
        "--model",
        &tiny,
        "--adapter",
        &adapter,
        "--out",
        out.to_str().unwrap(),
    ]);
    common::assert_one_line_error(&o, "pass --overwrite to replace it");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "user data"
    );
    // A file is never replaced, even with --overwrite.
    let file = out.join("keep.txt");
    let o = common::phitune(&[
        "merge",
        "--model",
        &tiny,
        "--adapter",
        &adapter,
        "--out",
        file.to_str().unwrap(),
        "--overwrite",
    ]);
    common::assert_one_line_error(&o, "is not a directory");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "user data");
    // A failed merge (a broken adapter) with --overwrite leaves the old directory alone.
    let broken = common::scratch("merge-broken-adapter");
    std::fs::write(broken.join("adapter_config.json"), "{").unwrap();
    let o = common::phitune(&[
        "merge",
        "--model",
        &tiny,
        "--adapter",
        broken.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(!o.status.success());
    assert!(out.join("keep.txt").is_file());
    // With --overwrite the directory is replaced by the merged checkpoint.
    let o = common::phitune(&[
        "merge",
        "--model",
        &tiny,
        "--adapter",
        &adapter,
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(!out.join("keep.txt").exists());
    assert!(Checkpoint::open(&out).is_ok());
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".merge-nonempty"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // An adapter for another model (tiny-phi-alt has other dimensions).
    let alt = common::fixtures()
        .join("tiny-phi-alt")
        .display()
        .to_string();
    let o = common::phitune(&[
        "score",
        "--model",
        &alt,
        "--adapter",
        &adapter,
        "--text",
        "hello there",
    ]);
    common::assert_one_line_error(&o, "another model");

    // DoRA, a missing weights file, a broken config.
    let bad = common::scratch("bad-adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(Path::new(&adapter).join(f), bad.join(f)).unwrap();
    }
    let cfg = bad.join("adapter_config.json");
    let score_bad = || {
        common::phitune(&[
            "score",
            "--model",
            &tiny,
            "--adapter",
            bad.to_str().unwrap(),
            "--text",
            "hello there",
        ])
    };
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let o = score_bad();
    common::assert_one_line_error(&o, "DoRA");
    std::fs::write(&cfg, text.replace("\"r\": 4", "\"r\": 8")).unwrap();
    let o = score_bad();
    common::assert_one_line_error(&o, "rank 4 in the weights, 8 in adapter_config.json");
    std::fs::write(&cfg, &text).unwrap();
    std::fs::remove_file(bad.join("adapter_model.safetensors")).unwrap();
    let o = score_bad();
    common::assert_one_line_error(&o, "no adapter_model.safetensors");
}

#[test]
fn score_with_adapter_flag_matches_peft() {
    let exp = common::expected();
    let entry = &exp["adapters"]["peft-qkvd-r4"];
    let case = &entry["score"][0];
    let tiny = common::fixtures().join("tiny-phi").display().to_string();
    let dir = common::fixtures()
        .join("adapters/peft-qkvd-r4")
        .display()
        .to_string();
    let o = common::phitune(&[
        "score",
        "--model",
        &tiny,
        "--adapter",
        &dir,
        "--text",
        case["text"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let v: serde_json::Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    for (g, w) in f64s(&v["nll"]).iter().zip(f64s(&case["nll"])) {
        assert!((g - w).abs() < 1e-3);
    }
}

type A = Autodiff<B>;

/// A few AdamW steps of next-token loss on one sentence, through the real model code.
fn train_steps(model: Phi<A>, tok: &PhiTokenizer, steps: usize, lr: f64) -> Phi<A> {
    let device = Default::default();
    let tokens = tok
        .encode("i like to swim in the lake every morning before work.")
        .unwrap();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .init::<A, Phi<A>>();
    let mut model = model;
    let n = tokens.len() - 1;
    let targets = Tensor::<A, 1, Int>::from_data(
        TensorData::new(
            tokens[1..].iter().map(|&t| t as i64).collect::<Vec<_>>(),
            [n],
        ),
        &device,
    );
    for _ in 0..steps {
        let logits = model.forward(ids_tensor::<A>(&tokens[..n], &device));
        let logp = log_softmax(logits, 2).reshape([n, model.vocab_size()]);
        let loss = logp.gather(1, targets.clone().reshape([n, 1])).mean().neg();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let trainable = model
            .projections()
            .iter()
            .filter(|p| p.2.lora.is_some())
            .count();
        assert_eq!(
            grads.len(),
            2 * trainable,
            "gradients for exactly the A and B of each adapter"
        );
        model = optim.step(lr, model, grads);
    }
    model
}

fn load_trainable(config: &LoraConfig) -> (Phi<A>, PhiTokenizer) {
    let device = Default::default();
    let dir = common::fixtures().join("tiny-phi");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = PhiTokenizer::from_dir(&dir, ckpt.config()).unwrap();
    (
        Phi::load(&ckpt, &device)
            .unwrap()
            .with_lora(config, 7, &device),
        tok,
    )
}

/// Only A and B get gradients and optimizer updates; every base weight stays bit-identical.
#[test]
fn only_adapters_train() {
    let mut config = LoraConfig::seed();
    config.dropout = 0.0;
    let (model, tok) = load_trainable(&config);
    let base_before: Vec<TensorData> = model
        .projections()
        .iter()
        .map(|p| p.2.base.dense_weight().into_data())
        .collect();
    let embed_before = model.embed_tokens.clone().into_data();
    let lora_before: Vec<TensorData> = model
        .projections()
        .iter()
        .filter_map(|p| p.2.lora.as_ref())
        .map(|l| l.b.val().into_data())
        .collect();
    let model = train_steps(model, &tok, 3, 1e-2);
    let base_after: Vec<TensorData> = model
        .projections()
        .iter()
        .map(|p| p.2.base.dense_weight().into_data())
        .collect();
    assert_eq!(base_before, base_after, "base weights changed");
    assert_eq!(embed_before, model.embed_tokens.clone().into_data());
    let lora_after: Vec<TensorData> = model
        .projections()
        .iter()
        .filter_map(|p| p.2.lora.as_ref())
        .map(|l| l.b.val().into_data())
        .collect();
    assert!(
        lora_before.iter().zip(&lora_after).all(|(a, b)| a != b),
        "every B must have trained"
    );
}

const TRAINED: &str = "adapters/ours-trained-all-r4";

fn trained_config() -> LoraConfig {
    let mut config = LoraConfig::seed();
    config.target_modules = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
        .map(String::from)
        .to_vec();
    config
}

/// Regenerates the committed adapter trained by this tool (then run
/// `make_fixtures.py --adapters-only` so PEFT scores it).
#[test]
#[ignore]
fn regenerate_trained_fixture() {
    let config = trained_config();
    let (model, tok) = load_trainable(&config);
    let model = train_steps(model, &tok, 20, 1e-2);
    let dir = common::fixtures().join(TRAINED);
    let _ = std::fs::remove_dir_all(&dir);
    model
        .adapter(&config, Some("tiny-phi".into()))
        .write(&dir)
        .unwrap();
}

/// An adapter trained here loads in PEFT (make_fixtures.py) and scores the same there.
#[test]
fn trained_adapter_scores_the_same_in_peft() {
    let exp = common::expected();
    let entry = &exp["adapters"]["ours-trained-all-r4"];
    assert!(
        entry["base_nll_delta_max"].as_f64().unwrap() > 0.01,
        "training must have changed the model"
    );
    let (model, tok) = load("tiny-phi");
    let adapter = Adapter::read(&common::fixtures().join(TRAINED)).unwrap();
    assert_eq!(
        adapter.config.target_modules,
        trained_config().target_modules
    );
    let model = model.with_adapter(&adapter, &Default::default()).unwrap();
    assert_nll_close(&model, &tok, &entry["score"], "trained");
}
#[test]
fn lora_weights_delta_is_checked() {
    let w = LoraWeights {
        r: 2,
        d_in: 3,
        d_out: 1,
        a: vec![1.0, 0.0, 2.0, 0.0, 1.0, 0.0],
        b: vec![1.0, 1.0],
        scaling: 2.0,
    };
    assert_eq!(w.delta(), vec![2.0, 2.0, 4.0]);
}

/// QLoRA: LoRA on an NF4 base trains A and B (gradients flow through the 4-bit op to the
/// input and on to earlier adapters); the packed base weights stay bit-identical.
#[test]
fn qlora_trains_adapters_on_an_nf4_base() {
    use phitune_model::frozen::FrozenWeight;
    use phitune_model::phi::Quantization;
    let device = Default::default();
    let dir = common::fixtures().join("tiny-phi");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = PhiTokenizer::from_dir(&dir, ckpt.config()).unwrap();
    let mut config = trained_config();
    config.dropout = 0.0;
    let model: Phi<A> = Phi::load_with(&ckpt, &device, Some(Quantization { double_quant: true }))
        .unwrap()
        .with_lora(&config, 7, &device);
    let packed = |m: &Phi<A>| -> Vec<TensorData> {
        m.projections()
            .iter()
            .map(|p| match &p.2.base.weight {
                FrozenWeight::Nf4(q) => q.packed.to_data(),
                FrozenWeight::Dense(_) => panic!("expected an NF4 base"),
            })
            .collect()
    };
    let before = packed(&model);
    let a_before: Vec<TensorData> = model
        .projections()
        .iter()
        .filter_map(|p| p.2.lora.as_ref())
        .map(|l| l.a.val().into_data())
        .collect();
    let model = train_steps(model, &tok, 3, 1e-2);
    assert_eq!(before, packed(&model));
    let a_after: Vec<TensorData> = model
        .projections()
        .iter()
        .filter_map(|p| p.2.lora.as_ref())
        .map(|l| l.a.val().into_data())
        .collect();
    // A only moves once B is non-zero and gradient reaches it through the NF4 layers above.
    assert!(
        a_before.iter().zip(&a_after).all(|(x, y)| x != y),
        "every A must have trained"
    );
}

/// `merge --quant nf4` folds the adapter into the dequantized NF4 weights (what a QLoRA adapter
/// was trained against): the merged float model scores like the NF4 base with the adapter.
#[test]
fn merge_into_nf4_base_equals_adapter_on_nf4_base() {
    use phitune_model::phi::Quantization;
    let adapter_dir = common::fixtures().join("adapters/peft-qkvd-r4");
    let out = common::scratch("merge-nf4").join("merged");
    let tiny = common::fixtures().join("tiny-phi").display().to_string();
    let o = common::phitune(&[
        "merge",
        "--model",
        &tiny,
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quant",
        "nf4",
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("writing float weights"));
    let device = Default::default();
    let ckpt = Checkpoint::open(&common::fixtures().join("tiny-phi")).unwrap();
    let (_, tok) = load("tiny-phi");
    let qlora = Phi::<B>::load_with(&ckpt, &device, Some(Quantization { double_quant: true }))
        .unwrap()
        .with_adapter(&Adapter::read(&adapter_dir).unwrap(), &device)
        .unwrap();
    let merged: Phi<B> = Phi::load(&Checkpoint::open(&out).unwrap(), &device).unwrap();
    for (m, q) in all_nll(&merged, &tok).iter().zip(all_nll(&qlora, &tok)) {
        assert!((m - q).abs() < 1e-4, "{m} vs {q}");
    }
}
