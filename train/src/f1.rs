//! ParlAI-style unigram F1 between a generated answer and its reference.
//!
//! This mirrors ParlAI's `normalize_answer` and `F1Metric._prec_recall_f1_score`
//! (`parlai/core/metrics.py`) so scores are comparable with numbers reported by
//! ParlAI-based evaluations:
//!
//! 1. lower-case the text;
//! 2. replace every ASCII punctuation character (Python's `string.punctuation`)
//!    with a space;
//! 3. replace the articles `a`, `an`, `the` with a space wherever they form a
//!    whole word (ParlAI's regex `\b(a|an|the)\b`, word boundaries evaluated on
//!    the text after step 2);
//! 4. collapse whitespace (split on whitespace, join with one space).
//!
//! F1 is computed over the whitespace tokens of the normalized strings using
//! multiset (bag-of-words) overlap. ParlAI takes the maximum over several gold
//! answers; here there is exactly one reference per prediction.
//!
//! Unicode input is accepted. Lower-casing uses [`str::to_lowercase`], and a
//! "word character" for the article boundaries is a Unicode alphanumeric
//! character or `_`, which matches Python's `\w` for practically all text.

use std::collections::HashMap;

/// Normalizes `text` the way ParlAI's `normalize_answer` does.
pub fn normalize(text: &str) -> String {
    let lowered = text.to_lowercase();
    let depunctuated: Vec<char> = lowered
        .chars()
        .map(|c| if c.is_ascii_punctuation() { ' ' } else { c })
        .collect();
    let without_articles = remove_articles(&depunctuated);
    without_articles
        .split(is_python_whitespace)
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Normalizes `text` and splits it into whitespace-separated tokens.
pub fn tokens(text: &str) -> Vec<String> {
    normalize(text)
        .split(' ')
        .filter(|word| !word.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Unigram F1 of `prediction` against `reference` after normalization.
///
/// Returns 0.0 when the two share no token, which includes the case where
/// either side is empty (or normalizes to nothing).
pub fn unigram_f1(prediction: &str, reference: &str) -> f64 {
    let pred = tokens(prediction);
    let gold = tokens(reference);
    prec_recall_f1(&pred, &gold).2
}

/// Mean unigram F1 over `(prediction, reference)` pairs; 0.0 for an empty slice.
pub fn mean_f1(pairs: &[(&str, &str)]) -> f64 {
    if pairs.is_empty() {
        return 0.0;
    }
    let total: f64 = pairs
        .iter()
        .map(|(prediction, reference)| unigram_f1(prediction, reference))
        .sum();
    total / pairs.len() as f64
}

/// Precision, recall and F1 of `pred` against `gold` (ParlAI's
/// `_prec_recall_f1_score`, including its order of floating-point operations).
fn prec_recall_f1(pred: &[String], gold: &[String]) -> (f64, f64, f64) {
    let gold_counts = counts(gold);
    let num_same: usize = counts(pred)
        .iter()
        .map(|(token, &n)| n.min(gold_counts.get(token).copied().unwrap_or(0)))
        .sum();
    if num_same == 0 {
        return (0.0, 0.0, 0.0);
    }
    let precision = num_same as f64 / pred.len() as f64;
    let recall = num_same as f64 / gold.len() as f64;
    let f1 = (2.0 * precision * recall) / (precision + recall);
    (precision, recall, f1)
}

fn counts(tokens: &[String]) -> HashMap<&str, usize> {
    let mut map = HashMap::new();
    for token in tokens {
        *map.entry(token.as_str()).or_insert(0) += 1;
    }
    map
}

/// Replaces every whole-word `a`, `an` or `the` with a single space, scanning
/// left to right like Python's `re.sub(r'\b(a|an|the)\b', ' ', s)`.
fn remove_articles(chars: &[char]) -> String {
    let mut out = String::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !is_word_char(chars[i - 1]);
        let article_len = if starts_word {
            ARTICLES.iter().find_map(|article| {
                let len = article.chars().count();
                let matches = chars.len() - i >= len
                    && article.chars().zip(&chars[i..]).all(|(a, &c)| a == c)
                    && chars.get(i + len).is_none_or(|&next| !is_word_char(next));
                matches.then_some(len)
            })
        } else {
            None
        };
        match article_len {
            Some(len) => {
                out.push(' ');
                i += len;
            }
            None => {
                out.push(chars[i]);
                i += 1;
            }
        }
    }
    out
}

const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// Python's `\w` for `str` patterns: alphanumeric characters and underscore.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Python's `str.split()` separators: Unicode white space plus the ASCII
/// information separators U+001C..U+001F, which Python also treats as space.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn identical_strings_score_one() {
        assert!(close(
            unigram_f1("The quick brown fox.", "The quick brown fox."),
            1.0
        ));
        assert!(close(unigram_f1("Hello, World!", "hello world"), 1.0));
    }

    #[test]
    fn partial_overlap() {
        assert_eq!(tokens("The cat sat."), vec!["cat", "sat"]);
        assert_eq!(tokens("a cat sat down"), vec!["cat", "sat", "down"]);
        // p = 1, r = 2/3, f1 = 2 * (2/3) / (5/3) = 0.8
        assert!(close(unigram_f1("The cat sat.", "a cat sat down"), 0.8));
        // Swapping the roles swaps precision and recall; F1 is symmetric.
        assert!(close(unigram_f1("a cat sat down", "The cat sat."), 0.8));
    }

    #[test]
    fn punctuation_becomes_space() {
        assert_eq!(normalize("don't"), "don t");
        assert_eq!(tokens("don't"), vec!["don", "t"]);
        assert_eq!(normalize("x_y-z/w"), "x y z w");
        assert_eq!(
            normalize("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
            "",
            "all of string.punctuation is removed"
        );
    }

    #[test]
    fn repeated_tokens_use_multiset_counts() {
        // common = {dog: 1}; p = 1/3, r = 1, f1 = 2 * (1/3) / (4/3) = 0.5
        assert!(close(unigram_f1("dog dog dog", "dog"), 0.5));
        assert!(close(unigram_f1("dog", "dog dog dog"), 0.5));
        // common = {dog: 2}; p = 2/3, r = 1, f1 = 0.8
        assert!(close(unigram_f1("dog dog cat", "dog dog"), 0.8));
    }

    #[test]
    fn articles_removed_only_as_whole_words() {
        assert_eq!(normalize("another theory"), "another theory");
        assert_eq!(
            normalize("The apple and an orange, a pear"),
            "apple and orange pear"
        );
        assert_eq!(normalize("A man, a plan"), "man plan");
        // Punctuation is replaced first, so "the-end" becomes "the end".
        assert_eq!(normalize("the-end"), "end");
        // An underscore is replaced by a space, so it separates words too.
        assert_eq!(normalize("a_b"), "b");
        assert_eq!(normalize("thea athe"), "thea athe");
    }

    #[test]
    fn empty_inputs_score_zero() {
        assert_eq!(unigram_f1("", ""), 0.0);
        assert_eq!(unigram_f1("", "cat"), 0.0);
        assert_eq!(unigram_f1("cat", ""), 0.0);
        // Normalizes to nothing on both sides.
        assert_eq!(unigram_f1("The.", "a!"), 0.0);
        assert_eq!(unigram_f1("cat", "dog"), 0.0);
        assert!(tokens("  ... ").is_empty());
    }

    #[test]
    fn whitespace_is_collapsed() {
        assert_eq!(normalize("  cat\t\tsat \n down  "), "cat sat down");
        assert_eq!(normalize("cat\u{1f}sat\u{a0}down"), "cat sat down");
    }

    #[test]
    fn unicode_input_does_not_panic() {
        assert_eq!(
            normalize("Ünïcödé CAFÉ — the «naïve» test"),
            "ünïcödé café — «naïve» test"
        );
        assert!(close(unigram_f1("Ünïcödé café", "ünïcödé CAFÉ"), 1.0));
        // Non-ASCII punctuation is not removed, matching string.punctuation.
        assert_eq!(tokens("¿qué?"), vec!["¿qué"]);
        // A non-word character next to an article is a word boundary.
        assert_eq!(normalize("a€b the€"), "€b €");
        // Lower-casing may change the length of the string.
        assert_eq!(normalize("İ"), "i\u{307}");
        assert!(close(unigram_f1("日本語 テキスト", "日本語"), 2.0 / 3.0));
    }

    #[test]
    fn mean_over_pairs() {
        assert_eq!(mean_f1(&[]), 0.0);
        let pairs = [("cat sat", "cat sat"), ("dog dog dog", "dog"), ("x", "y")];
        assert!(close(mean_f1(&pairs), (1.0 + 0.5 + 0.0) / 3.0));
    }
}
