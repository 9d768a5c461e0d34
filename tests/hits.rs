//! `eval --hits N`: Hits@1 among N candidate replies per held-out row, checked against an
//! independent path (each candidate scored alone, the whole prompt and reply recomputed without
//! a cache or batching), and ties (a distractor equal to the reference) counted as misses.

mod common;

use std::path::Path;

use burn::backend::NdArray;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use phitune_data::prompt::{Encoded, IGNORE};
use phitune_data::{PersonaRow, Template};
use phitune_model::io::adapter::Adapter;
use phitune_model::{Checkpoint, Phi, PhiTokenizer};
use serde_json::Value;

type B = NdArray<f32>;

fn eval(data: &Path, out: &Path, extra: &[&str]) -> Value {
    let tiny = common::fixtures().join("tiny-phi");
    let adapter = common::fixtures().join("adapters/ours-train-demo");
    let mut args = vec![
        "eval",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = common::phitune(&args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    serde_json::from_str(common::stdout(&o).trim()).unwrap()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The mean NLL of `reply` (the template's response tokens and eos) after `prompt`: one full
/// forward pass over both, no cache.
fn alone(phi: &Phi<B>, tok: &PhiTokenizer, prompt: &[u32], reply: &str) -> f64 {
    let mut ids = prompt.to_vec();
    ids.extend(tok.encode(&Template::Persona.response_text(reply)).unwrap());
    ids.push(tok.eos_token_ids[0]);
    let dev = Default::default();
    let x = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&t| t as i64).collect(), [1, ids.len()]),
        &dev,
    );
    let lp: Vec<f32> = log_softmax(phi.forward(x), 2)
        .into_data()
        .into_vec()
        .unwrap();
    let v = lp.len() / ids.len();
    let targets = prompt.len()..ids.len();
    let n = targets.len();
    let sum: f64 = targets
        .map(|t| -(lp[(t - 1) * v + ids[t] as usize] as f64))
        .sum();
    sum / n as f64
}

#[test]
fn hits_rank_the_candidates_as_scoring_each_alone_does() {
    let dir = common::scratch("hits-rank");
    let data = common::root().join("data/samples/persona_chat_sample.jsonl");
    let summary = eval(
        &data,
        &dir.join("eval"),
        &["--valid-fraction", "0.3", "--limit", "8", "--hits", "5"],
    );
    assert_eq!(summary["hits_n"], 5);
    let rows = lines(&dir.join("eval/hits.jsonl"));
    assert_eq!(rows.len(), 8);

    let tiny = common::fixtures().join("tiny-phi");
    let ckpt = Checkpoint::open(&tiny).unwrap();
    let tok = PhiTokenizer::from_dir(&tiny, ckpt.config()).unwrap();
    let dev = Default::default();
    let adapter = Adapter::read(&common::fixtures().join("adapters/ours-train-demo")).unwrap();
    let phi = Phi::<B>::load_with(&ckpt, &dev, None)
        .unwrap()
        .with_adapter(&adapter, &dev)
        .unwrap();
    let loaded = phitune_data::load::load_path(&data, Default::default()).unwrap();
    let mut hits = 0;
    for (i, line) in rows.iter().enumerate() {
        let conv = line["conv_id"].as_str().unwrap();
        let row: &PersonaRow = loaded.rows.iter().find(|r| r.conv_id == conv).unwrap();
        let Encoded::Kept(ex) = Template::Persona.encode(&tok, row, 512).unwrap() else {
            panic!("row {conv} dropped")
        };
        let first = ex.labels.iter().position(|&l| l != IGNORE).unwrap();
        let prompt = &ex.input_ids[..first];
        assert_eq!(line["prompt"], tok.decode(prompt).unwrap());
        let cands = line["candidates"].as_array().unwrap();
        assert_eq!(cands.len(), 5);
        // Candidate rows: this row, then the next ones, wrapping.
        for (k, c) in cands.iter().enumerate() {
            assert_eq!(c["row"], (i + k) % 8, "row {i}");
        }
        assert_eq!(cands[0]["text"], row.reference.as_str());
        let mine: Vec<f64> = cands
            .iter()
            .map(|c| alone(&phi, &tok, prompt, c["text"].as_str().unwrap()))
            .collect();
        for (c, m) in cands.iter().zip(&mine) {
            let got = c["mean_nll"].as_f64().unwrap();
            assert!((got - m).abs() < 1e-4, "row {i}: {got} vs {m}");
        }
        let rank = 1 + mine[1..].iter().filter(|&&d| d <= mine[0]).count();
        assert_eq!(line["reference_rank"], rank, "row {i}");
        hits += usize::from(rank == 1);
    }
    let h = summary["hits_at_1"].as_f64().unwrap();
    assert!((h - hits as f64 / 8.0).abs() < 1e-12, "{h} vs {hits}/8");
}

#[test]
fn a_distractor_equal_to_the_reference_is_a_miss_not_a_crash() {
    let dir = common::scratch("hits-ties");
    let data = dir.join("same.jsonl");
    let rows: Vec<String> = (0..6)
        .map(|i| {
            serde_json::json!({
                "conv_id": format!("same-{i}"),
                "persona_b": ["i like tea.", format!("i have {i} cats.")],
                "dialogue": [format!("hello number {i}, what do you like?")],
                "reference": "i like tea very much.",
            })
            .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let summary = eval(
        &data,
        &dir.join("eval"),
        &["--valid-fraction", "0.9", "--hits", "20", "--compare-base"],
    );
    let n = summary["rows"].as_u64().unwrap();
    assert!(n >= 2, "{summary}");
    assert_eq!(summary["hits_n"], n, "N is capped at the held-out rows");
    assert_eq!(summary["hits_at_1"], 0.0);
    assert_eq!(summary["base_hits_at_1"], 0.0);
    for line in lines(&dir.join("eval/hits.jsonl")) {
        assert_eq!(line["reference_rank"], n, "every distractor ties: {line}");
        assert_eq!(line["base_reference_rank"], n);
    }
}
