//! CLIP's byte-level BPE tokenizer, as the reference `CLIPTokenizer` runs it: special tokens
//! split off, NFC, lower case, the CLIP pre-tokenizer pattern, byte-to-unicode mapping, BPE
//! merges with `</w>` word ends, then `<|startoftext|> ... <|endoftext|>` padded or truncated
//! to the context length.
//!
//! Reads the diffusers `tokenizer/` layout: `vocab.json`, `merges.txt` and, when present,
//! `special_tokens_map.json` / `tokenizer_config.json` (pad token and length).

use std::collections::HashMap;

use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};
use crate::source::Source;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// Texts the reference splits out before normalising (its special tokens) and their ids.
    specials: Vec<(String, u32)>,
    ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub max_len: usize,
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_chars() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut out = ['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below surrogates")
        };
    }
    out
}

/// The reference normaliser: NFC, then lower case (whitespace runs only separate words).
fn normalize(text: &str) -> String {
    text.nfc().collect::<String>().to_lowercase()
}

/// CLIP's pre-tokenizer pattern, `'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`, as a
/// scanner (special tokens are split off before it runs). Letters are Rust's alphabetic
/// characters that are not numeric, which differs from `\p{L}` only on combining marks.
fn pre_tokenize(text: &str) -> Vec<&str> {
    let is_number = |c: char| c.is_numeric();
    let is_letter = |c: char| c.is_alphabetic() && !c.is_numeric();
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let special = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
            .into_iter()
            .find(|p| rest.starts_with(p));
        let len = if let Some(p) = special {
            p.len()
        } else if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
            continue;
        } else if is_number(c) {
            c.len_utf8()
        } else {
            let same_class = |d: char| {
                if is_letter(c) {
                    is_letter(d)
                } else {
                    !(d.is_whitespace() || is_letter(d) || is_number(d))
                }
            };
            rest.char_indices().find(|&(_, d)| !same_class(d)).map_or(rest.len(), |(i, _)| i)
        };
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    out
}

impl ClipTokenizer {
    /// From the contents of `vocab.json` and `merges.txt`; `pad` is the padding token's text
    /// (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).
    pub fn new(vocab_json: &str, merges_txt: &str, pad: &str, max_len: usize) -> Result<Self> {
        let err = |file: &str, detail: String| Error::Tokenizer {
            file: file.to_string(),
            detail,
        };
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab_json).map_err(|e| err("vocab.json", format!("not a token -> id map: {e}")))?;
        let mut ranks = HashMap::new();
        for (i, line) in merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.is_empty())
            .enumerate()
        {
            let Some((a, b)) = line.split_once(' ') else {
                return Err(err("merges.txt", format!("line {} is not a pair: {line:?}", i + 2)));
            };
            ranks.insert((a.to_string(), b.to_string()), i);
        }
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| err("vocab.json", format!("has no token {t:?}")))
        };
        if max_len < 2 {
            return Err(err(
                "tokenizer_config.json",
                format!("model_max_length {max_len} leaves no room for text"),
            ));
        }
        let (bos, eos, pad_id) = (id(BOS)?, id(EOS)?, id(pad)?);
        Ok(Self {
            specials: vec![(BOS.to_string(), bos), (EOS.to_string(), eos), (pad.to_string(), pad_id)],
            bos,
            eos,
            pad: pad_id,
            vocab,
            ranks,
            byte_chars: byte_chars(),
            max_len,
        })
    }

    /// From a diffusers `tokenizer/` folder (`dir` names it inside `source`; "" for the root).
    pub fn from_source(source: &impl Source, dir: &str) -> Result<Self> {
        let path = |name: &str| {
            if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            }
        };
        let json = |name: &str| -> Option<serde_json::Value> { serde_json::from_str(&source.text(&path(name)).ok()?).ok() };
        let token_text = |v: &serde_json::Value| v.as_str().or_else(|| v["content"].as_str()).map(str::to_string);
        let pad = json("special_tokens_map.json")
            .and_then(|m| token_text(&m["pad_token"]))
            .or_else(|| json("tokenizer_config.json").and_then(|c| token_text(&c["pad_token"])))
            .unwrap_or_else(|| EOS.to_string());
        let max_len = json("tokenizer_config.json")
            .and_then(|c| c["model_max_length"].as_u64())
            .filter(|&n| n <= 1 << 20)
            .map_or(77, |n| n as usize);
        let vocab = source.text(&path("vocab.json"))?;
        let merges = source.text(&path("merges.txt"))?;
        Self::new(&vocab, &merges, &pad, max_len)
    }

    /// The same tokenizer padding with `pad` (SD 2.x pads with `!`, SD 1.x with the end token).
    pub fn with_pad(mut self, pad: &str) -> Result<Self> {
        let id = self.vocab.get(pad).copied().ok_or_else(|| Error::Tokenizer {
            file: "vocab.json".into(),
            detail: format!("has no token {pad:?}"),
        })?;
        self.specials = vec![(BOS.to_string(), self.bos), (EOS.to_string(), self.eos), (pad.to_string(), id)];
        self.pad = id;
        Ok(self)
    }

    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let (a, b) = (parts[i].clone(), parts[i + 1].clone());
            // Merge every occurrence of the pair, left to right, as the reference does.
            let mut merged = Vec::with_capacity(parts.len());
            let mut j = 0;
            while j < parts.len() {
                if j + 1 < parts.len() && parts[j] == a && parts[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(std::mem::take(&mut parts[j]));
                    j += 1;
                }
            }
            parts = merged;
        }
        out.extend(parts.iter().map(|p| self.vocab.get(p).copied().unwrap_or(self.eos)));
    }

    /// Token ids of `text` without the start/end tokens.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            // The earliest special token in the text, the longest one where several start.
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, usize::MAX - s.len(), s.len(), *id)))
                .min();
            let plain = next.map_or(rest, |(at, ..)| &rest[..at]);
            for piece in pre_tokenize(&normalize(plain)) {
                let mapped: String = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
                self.bpe(&mapped, &mut ids);
            }
            let Some((at, _, len, id)) = next else { break };
            ids.push(id);
            rest = &rest[at + len..];
        }
        ids
    }

    /// `max_len` ids: start token, the text truncated to fit, end token, padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos];
        ids.extend(self.encode_text(text).into_iter().take(self.max_len - 2));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_splits_like_the_reference_pattern() {
        assert_eq!(
            pre_tokenize("it's 3 o'clock; don't 42 a+b"),
            ["it", "'s", "3", "o", "'", "clock", ";", "don", "'t", "4", "2", "a", "+", "b"]
        );
    }
}
