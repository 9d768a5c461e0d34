//! The data pipeline: sources, validation, the two templates' exact rendering and masking,
//! the split, batching, and the hub path through a local fake of the HF cache.

mod common;

use std::path::{Path, PathBuf};

use phitune_data::batch::{ExampleDataset, collate};
use phitune_data::load::{LoadOptions, load_path};
use phitune_data::prompt::{Encoded, IGNORE, SEED_LEN};
use phitune_data::split::{Split, split_of};
use phitune_data::{PersonaRow, Template};
use phitune_model::{Checkpoint, PhiTokenizer};

fn sample(ext: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("data/samples/persona_chat_sample.{ext}"))
}

fn tok() -> PhiTokenizer {
    let dir = common::fixtures().join("tiny-phi");
    PhiTokenizer::from_dir(&dir, Checkpoint::open(&dir).unwrap().config()).unwrap()
}

fn row(persona: &[&str], dialogue: &[&str], reference: &str) -> PersonaRow {
    PersonaRow {
        conv_id: "t-1".into(),
        persona_b: persona.iter().map(|s| s.to_string()).collect(),
        dialogue: dialogue.iter().map(|s| s.to_string()).collect(),
        reference: reference.into(),
    }
}

#[test]
fn parquet_and_jsonl_give_identical_rows_and_examples() {
    let a = load_path(&sample("jsonl"), LoadOptions::default()).unwrap();
    let b = load_path(&sample("parquet"), LoadOptions::default()).unwrap();
    assert_eq!(a.rows.len(), 200);
    assert_eq!(a.rows, b.rows);
    let tok = tok();
    let ea = ExampleDataset::build(&a.rows, &tok, Template::Persona, 512).unwrap();
    let eb = ExampleDataset::build(&b.rows, &tok, Template::Persona, 512).unwrap();
    assert_eq!(ea.examples, eb.examples);
    // The sample spans 1..=9 turns.
    for n in 1..=9 {
        assert!(
            a.rows.iter().any(|r| r.dialogue.len() == n),
            "no row with {n} turns"
        );
    }
}

#[test]
fn seed_template_is_the_original_recipe() {
    let r = row(
        &["i like cats.", "i am a nurse."],
        &["hi!", "hello, how are you?"],
        "great, thanks.",
    );
    assert_eq!(
        Template::Seed.prompt_text(&r.persona_b, &r.dialogue),
        "Instruct: Given this persona: i like cats. i am a nurse.\nand this dialogue: hi! hello, how are you?\ngenerate a response.\nOutput:"
    );
    // Each field is cut to its first 256 characters (characters, not bytes).
    let long: String = "é".repeat(300);
    let r2 = row(&[&long], &["x"], "y");
    let text = Template::Seed.prompt_text(&r2.persona_b, &r2.dialogue);
    let persona = text
        .strip_prefix("Instruct: Given this persona: ")
        .unwrap()
        .split('\n')
        .next()
        .unwrap();
    assert_eq!(persona.chars().count(), 256);
    // 128 tokens, padded with eos, loss on every non-pad token, no eos appended.
    let tok = tok();
    let eos = tok.eos_token_ids[0];
    let Encoded::Kept(ex) = Template::Seed.encode(&tok, &r, 512).unwrap() else {
        panic!()
    };
    assert_eq!(ex.input_ids.len(), SEED_LEN);
    let full = tok
        .encode(&format!(
            "{} great, thanks.",
            Template::Seed.prompt_text(&r.persona_b, &r.dialogue)
        ))
        .unwrap();
    assert_eq!(ex.len, full.len());
    assert_eq!(&ex.input_ids[..ex.len], &full[..]);
    assert!(ex.input_ids[ex.len..].iter().all(|&t| t == eos));
    assert!(
        ex.labels[..ex.len]
            .iter()
            .zip(&full)
            .all(|(&l, &t)| l == t as i64)
    );
    assert!(ex.labels[ex.len..].iter().all(|&l| l == IGNORE));
    assert_ne!(*full.last().unwrap(), eos, "the seed recipe appends no eos");
    // A long example is cut at 128 tokens.
    let r3 = row(
        &[&"i love long walks on the beach. ".repeat(20)],
        &[&"tell me more. ".repeat(30)],
        "ok",
    );
    let Encoded::Kept(ex) = Template::Seed.encode(&tok, &r3, 512).unwrap() else {
        panic!()
    };
    assert!(ex.truncated && ex.len == SEED_LEN);
}

#[test]
fn persona_template_masks_the_prompt_and_trains_eos() {
    let tok = tok();
    let eos = tok.eos_token_ids[0];
    let r = row(
        &["i like cats.", "i am a nurse."],
        &["hi!", "hello, how are you?", "good. what do you do?"],
        "i am a nurse.",
    );
    assert_eq!(
        Template::Persona.prompt_text(&r.persona_b, &r.dialogue),
        "Instruct: Given this persona: i like cats. i am a nurse.\nand this dialogue:\nhi!\nhello, how are you?\ngood. what do you do?\ngenerate a response.\nOutput:"
    );
    let Encoded::Kept(ex) = Template::Persona.encode(&tok, &r, 512).unwrap() else {
        panic!()
    };
    let prompt = tok
        .encode(&Template::Persona.prompt_text(&r.persona_b, &r.dialogue))
        .unwrap();
    let response = tok.encode(" i am a nurse.").unwrap();
    assert_eq!(
        ex.input_ids,
        [prompt.clone(), response.clone(), vec![eos]].concat()
    );
    assert!(ex.labels[..prompt.len()].iter().all(|&l| l == IGNORE));
    let trained: Vec<i64> = response
        .iter()
        .map(|&t| t as i64)
        .chain([eos as i64])
        .collect();
    assert_eq!(&ex.labels[prompt.len()..], &trained[..]);
    assert!(!ex.truncated);
    // The generation prompt is exactly the training prompt.
    assert_eq!(
        Template::Persona
            .prompt_ids(&tok, &r.persona_b, &r.dialogue, 512, 64)
            .unwrap(),
        prompt
    );

    // A tight budget drops the oldest turns first, keeping the one being answered.
    let full = prompt.len() + response.len() + 1;
    let Encoded::Kept(ex) = Template::Persona.encode(&tok, &r, full - 1).unwrap() else {
        panic!()
    };
    assert!(ex.truncated);
    let kept = tok.decode(&ex.input_ids).unwrap();
    assert!(
        !kept.contains("hi!\n") && kept.contains("good. what do you do?"),
        "{kept}"
    );
    // The reference is never truncated: an example that cannot fit is dropped.
    let long_ref = "word ".repeat(300);
    let r4 = row(&["i like cats."], &["hi"], long_ref.trim());
    assert_eq!(
        Template::Persona.encode(&tok, &r4, 128).unwrap(),
        Encoded::Dropped
    );
}

#[test]
fn split_is_stable_and_batches_pad() {
    let rows = load_path(&sample("jsonl"), LoadOptions::default())
        .unwrap()
        .rows;
    let v1: Vec<&str> = rows
        .iter()
        .filter(|r| split_of(&r.conv_id, 0.1) == Split::Valid)
        .map(|r| r.conv_id.as_str())
        .collect();
    let v2: Vec<&str> = rows
        .iter()
        .filter(|r| split_of(&r.conv_id, 0.1) == Split::Valid)
        .map(|r| r.conv_id.as_str())
        .collect();
    assert_eq!(v1, v2);
    assert!(
        (5..40).contains(&v1.len()),
        "{} of 200 held out at 10%",
        v1.len()
    );

    let tok = tok();
    let ds = ExampleDataset::build(&rows[..4], &tok, Template::Persona, 512).unwrap();
    let b = collate(&ds.examples, 7);
    let longest = ds.examples.iter().map(|e| e.len).max().unwrap();
    assert_eq!((b.batch, b.seq), (4, longest));
    for (i, e) in ds.examples.iter().enumerate() {
        let row = &b.input_ids[i * b.seq..(i + 1) * b.seq];
        let mask = &b.attention_mask[i * b.seq..(i + 1) * b.seq];
        let labels = &b.labels[i * b.seq..(i + 1) * b.seq];
        assert!(row[e.len..].iter().all(|&t| t == 7));
        assert_eq!(mask.iter().sum::<i64>() as usize, e.len);
        assert!(labels[e.len..].iter().all(|&l| l == IGNORE));
    }
}

fn write(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn malformed_rows_name_file_row_and_column() {
    let dir = common::scratch("bad-data");
    let good =
        r#"{"conv_id": "a", "persona_b": ["i sing."], "dialogue": ["hi"], "reference": "hello"}"#;
    let cases: [(&str, &[u8], &str); 9] = [
        (
            "missing.jsonl",
            br#"{"conv_id": "a", "persona_b": ["x"], "dialogue": ["hi"]}"#,
            "column reference: is missing",
        ),
        (
            "type.jsonl",
            br#"{"conv_id": "a", "persona_b": {"x": 1}, "dialogue": ["hi"], "reference": "r"}"#,
            "column persona_b: expected a list of strings or one string, found an object",
        ),
        (
            "dialogue_type.jsonl",
            br#"{"conv_id": "a", "persona_b": ["x"], "dialogue": "hi", "reference": "r"}"#,
            "column dialogue: expected a list of strings, found a string",
        ),
        (
            "item.jsonl",
            br#"{"conv_id": "a", "persona_b": ["x", 3], "dialogue": ["hi"], "reference": "r"}"#,
            "column persona_b[1]: expected a string, found a number",
        ),
        (
            "empty_persona.jsonl",
            br#"{"conv_id": "a", "persona_b": [], "dialogue": ["hi"], "reference": "r"}"#,
            "column persona_b: is an empty list",
        ),
        (
            "empty_ref.jsonl",
            br#"{"conv_id": "a", "persona_b": ["x"], "dialogue": ["hi"], "reference": "  "}"#,
            "column reference: is empty",
        ),
        (
            "empty_dialogue.jsonl",
            br#"{"conv_id": "a", "persona_b": ["x"], "dialogue": [], "reference": "r"}"#,
            "column dialogue: is an empty list",
        ),
        ("utf8.jsonl", b"{\"conv_id\": \"a\xff\"}", "not valid UTF-8"),
        ("json.jsonl", b"{not json", "invalid JSON"),
    ];
    for (name, text, want) in cases {
        let body = [good.as_bytes(), b"\n", text, b"\n"].concat();
        let p = write(&dir, name, &body);
        let e = load_path(&p, LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && e.contains(name), "{name}: {e}");
        assert!(e.contains("row 2"), "{name}: {e}");
        // With skip_invalid the good row survives and the bad one is counted.
        let l = load_path(&p, LoadOptions { skip_invalid: true }).unwrap();
        assert_eq!((l.rows.len(), l.skipped.len()), (1, 1), "{name}");
    }
    // An absurdly long line is refused without reading it whole.
    let mut huge = Vec::from(&br#"{"conv_id": "a", "persona_b": [""#[..]);
    huge.extend(std::iter::repeat_n(
        b'x',
        phitune_data::load::MAX_LINE_BYTES + 10,
    ));
    let p = write(&dir, "huge.jsonl", &huge);
    let e = load_path(&p, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("longer than"), "{e}");
    // Not a data file / not parquet.
    let p = write(&dir, "rows.csv", b"a,b");
    assert!(
        load_path(&p, LoadOptions::default())
            .unwrap_err()
            .to_string()
            .contains("unsupported data file")
    );
    let p = write(&dir, "fake.parquet", b"PAR1 not really");
    assert!(
        load_path(&p, LoadOptions::default())
            .unwrap_err()
            .to_string()
            .contains("not a readable parquet file")
    );
}

/// The hub path, offline, through a fake of the HF cache layout.
#[test]
fn hub_dataset_from_the_local_cache() {
    let home = common::scratch("fake-hf-home");
    let repo = home.join("hub/datasets--Cynaptics--persona-chat");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let data = repo.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(sample("parquet"), data.join("train-00000-of-00001.parquet")).unwrap();
    let tiny = common::fixtures().join("tiny-phi");
    let data = |id: &str| {
        common::phitune_with_hf_home(
            &["data", "--data", id, "--model", tiny.to_str().unwrap()],
            &home,
        )
    };
    let o = data("Cynaptics/persona-chat");
    let out = common::stdout(&o);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(out.contains("rows:      200 valid"), "{out}");
    // A dataset that is not cached fails with a clear message while offline.
    let o = data("someone/other-data");
    common::assert_one_line_error(&o, "HF_HUB_OFFLINE");
}
