//! `data`: what the model will be trained on, before any GPU hours are spent.

use anyhow::{Result, bail};
use phitune_data::batch::ExampleDataset;
use phitune_data::prompt::IGNORE;
use phitune_data::split::{Split, split_of};
use phitune_data::{LoadOptions, Template, load_source};
use phitune_model::{PhiConfig, PhiTokenizer};

use crate::cli::{DataArgs, DataSourceArgs};

impl DataSourceArgs {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.valid_fraction) {
            bail!("--valid-fraction {} must be in [0, 1)", self.valid_fraction);
        }
        if self.max_len < 16 || self.max_len > 1 << 16 {
            bail!("--max-len {} must be between 16 and 65536", self.max_len);
        }
        Ok(())
    }
}

pub fn run(args: DataArgs) -> Result<()> {
    let src = &args.source;
    src.validate()?;
    let dir = phitune_model::io::hub::resolve_model(&args.model, args.revision.as_deref())?;
    let config = PhiConfig::from_file(&dir.join("config.json"))?;
    let tok = PhiTokenizer::from_dir(&dir, &config)?;
    let t = std::time::Instant::now();
    let loaded = load_source(
        &src.data,
        src.data_revision.as_deref(),
        LoadOptions {
            skip_invalid: src.skip_invalid,
        },
    )?;
    let load_s = t.elapsed().as_secs_f64();
    if loaded.rows.is_empty() {
        bail!("{}: no valid rows", src.data);
    }
    let t = std::time::Instant::now();
    let ds = ExampleDataset::build(&loaded.rows, &tok, src.template, src.max_len)?;
    let tok_s = t.elapsed().as_secs_f64();
    let valid = loaded
        .rows
        .iter()
        .filter(|r| split_of(&r.conv_id, src.valid_fraction) == Split::Valid)
        .count();

    println!("source:    {} ({} file(s))", src.data, loaded.files.len());
    println!(
        "rows:      {} valid, {} skipped as malformed",
        loaded.rows.len(),
        loaded.skipped.len()
    );
    for s in loaded.skipped.iter().take(5) {
        println!("           skipped: {s}");
    }
    let form = match (loaded.persona_lists, loaded.persona_texts) {
        (_, 0) => "persona_b as lists of facts".to_string(),
        (0, _) => "persona_b as one string per row, split into facts at sentence ends".to_string(),
        (l, t) => format!(
            "persona_b as lists of facts in {l} rows, as one string (split into facts at sentence ends) in {t}"
        ),
    };
    println!("persona:   {form}");
    println!(
        "split:     train {}, valid {} (fraction {}, stable hash of conv_id)",
        loaded.rows.len() - valid,
        valid,
        src.valid_fraction
    );
    let limit = match src.template {
        Template::Seed => "fixed 128 tokens, pad = eos".to_string(),
        Template::Persona => format!("max {} tokens", src.max_len),
    };
    println!("template:  {} ({limit})", src.template);
    let cut = match src.template {
        Template::Seed => "cut at 128 tokens",
        Template::Persona => "oldest turns dropped to fit",
    };
    println!(
        "examples:  {} kept, {} dropped (reference cannot fit), {} truncated ({cut})",
        ds.examples.len(),
        ds.dropped,
        ds.truncated
    );
    println!("time:      load {load_s:.2}s, tokenize {tok_s:.2}s");

    let mut lens: Vec<usize> = ds.examples.iter().map(|e| e.len).collect();
    lens.sort_unstable();
    if !lens.is_empty() {
        let pct = |p: f64| lens[((lens.len() - 1) as f64 * p).round() as usize];
        println!(
            "tokens:    min {}  p50 {}  p90 {}  p99 {}  max {}",
            lens[0],
            pct(0.5),
            pct(0.9),
            pct(0.99),
            lens[lens.len() - 1]
        );
        let max = lens[lens.len() - 1].max(1);
        let width = (max / 8).max(1).next_power_of_two();
        let mut bins = vec![0usize; max / width + 1];
        for &l in &lens {
            bins[l / width] += 1;
        }
        let top = *bins.iter().max().unwrap();
        for (i, &c) in bins.iter().enumerate() {
            let bar = "#".repeat((c * 40).div_ceil(top.max(1)));
            println!(
                "  {:>5}-{:<5} {:>6} {bar}",
                i * width,
                (i + 1) * width - 1,
                c
            );
        }
    }

    let Some(ex) = ds
        .examples
        .get(args.show.min(ds.examples.len().saturating_sub(1)))
    else {
        return Ok(());
    };
    println!(
        "\nexample {} (loss on the text inside [[ ]], padding shown as <pad>xN):",
        args.show
    );
    let mut out = String::new();
    let mut i = 0;
    while i < ex.len {
        let trained = ex.labels[i] != IGNORE;
        let mut j = i;
        while j < ex.len && (ex.labels[j] != IGNORE) == trained {
            j += 1;
        }
        let ids = &ex.input_ids[i..j];
        let mut text = tok.decode(ids)?;
        if ids.last().is_some_and(|&t| tok.is_eos(t)) {
            text.push_str("<eos>");
        }
        if trained {
            out.push_str(&format!("[[{text}]]"));
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    if ex.input_ids.len() > ex.len {
        out.push_str(&format!("<pad>x{}", ex.input_ids.len() - ex.len));
    }
    println!("{out}");
    Ok(())
}
