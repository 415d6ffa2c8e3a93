//! SentencePiece unigram tokenizer, read from a `spiece.model` file (the UMT5 tokenizer of
//! Wan2.1): NFKC normalisation, whitespace cleanup and the `▁` word marker, then per word the
//! Viterbi segmentation that maximises the summed piece scores, unknown characters becoming
//! one `<unk>` per run, as the sentencepiece library does.
//!
//! The library's `nmt_nfkc` normaliser is NFKC plus a few extra mappings (control characters
//! dropped); this file applies NFKC and drops control characters, which agrees with it on
//! ordinary text.

use std::collections::HashMap;

use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

const WORD_MARK: char = '\u{2581}';

pub struct SentencePiece {
    pieces: HashMap<String, (u32, f32)>,
    max_piece_chars: usize,
    unk_score: f32,
    pub unk: u32,
    pub eos: u32,
    pub pad: u32,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
}

/// A protobuf field: number and payload (varints widened, fixed-width as raw bits).
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Reads the fields of one protobuf message (only what `spiece.model` uses).
fn fields(mut buf: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut buf)?),
            1 => {
                buf = buf.get(8..)?;
                continue;
            }
            2 => {
                let len = varint(&mut buf)? as usize;
                let (data, rest) = (buf.get(..len)?, buf.get(len..)?);
                buf = rest;
                Field::Bytes(data)
            }
            5 => {
                let v = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?);
                buf = &buf[4..];
                Field::Fixed32(v)
            }
            _ => return None,
        };
        out.push((key >> 3, field));
    }
    Some(out)
}

impl SentencePiece {
    /// Parses the bytes of a `spiece.model` file (`name` is for messages).
    pub fn from_model_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        let err = |detail: &str| Error::Tokenizer {
            file: name.to_string(),
            detail: detail.to_string(),
        };
        let top = fields(bytes).ok_or_else(|| err("not a SentencePiece model (malformed protobuf)"))?;
        let mut pieces = HashMap::new();
        let (mut unk, mut eos, mut pad) = (None, None, None);
        let (mut add_dummy_prefix, mut remove_extra_whitespaces) = (true, true);
        let mut min_score = f32::INFINITY;
        let mut index = 0u32;
        for (number, field) in top {
            match (number, field) {
                (1, Field::Bytes(p)) => {
                    let (mut text, mut score, mut kind) = (String::new(), 0.0f32, 1u64);
                    for (n, f) in fields(p).ok_or_else(|| err("malformed piece"))? {
                        match (n, f) {
                            (1, Field::Bytes(s)) => text = String::from_utf8(s.to_vec()).map_err(|_| err("piece is not UTF-8"))?,
                            (2, Field::Fixed32(bits)) => score = f32::from_bits(bits),
                            (3, Field::Varint(v)) => kind = v,
                            _ => {}
                        }
                    }
                    // 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
                    match kind {
                        2 => unk = Some(index),
                        3 if text == "</s>" => eos = Some(index),
                        3 if text == "<pad>" => pad = Some(index),
                        1 | 4 => {
                            min_score = min_score.min(score);
                            pieces.insert(text, (index, score));
                        }
                        _ => {}
                    }
                    index += 1;
                }
                (3, Field::Bytes(spec)) => {
                    for (n, f) in fields(spec).ok_or_else(|| err("malformed normalizer spec"))? {
                        match (n, f) {
                            (3, Field::Varint(v)) => add_dummy_prefix = v != 0,
                            (4, Field::Varint(v)) => remove_extra_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let unk = unk.ok_or_else(|| err("has no <unk> piece"))?;
        let max_piece_chars = pieces.keys().map(|p| p.chars().count()).max().unwrap_or(1);
        Ok(Self {
            pieces,
            max_piece_chars,
            // The library scores an unknown character 10 below the worst piece.
            unk_score: min_score - 10.0,
            unk,
            eos: eos.ok_or_else(|| err("has no </s> piece"))?,
            pad: pad.unwrap_or(0),
            add_dummy_prefix,
            remove_extra_whitespaces,
        })
    }

    /// The words of the normalised text, each starting with `▁`.
    fn words(&self, text: &str) -> Vec<String> {
        let nfkc: String = text.nfkc().filter(|c| !c.is_control() || c.is_whitespace()).collect();
        let joined = if self.remove_extra_whitespaces {
            nfkc.split_whitespace().collect::<Vec<_>>().join(" ")
        } else {
            nfkc
        };
        if joined.is_empty() {
            return vec![];
        }
        let marked = format!("{}{}", if self.add_dummy_prefix { " " } else { "" }, joined).replace(' ', &WORD_MARK.to_string());
        // Pieces never cross a word start, so each word is segmented on its own.
        let mut words = Vec::new();
        for c in marked.chars() {
            if c == WORD_MARK || words.is_empty() {
                words.push(String::new());
            }
            words.last_mut().expect("pushed").push(c);
        }
        words
    }

    /// Best-scoring segmentation of one word.
    fn viterbi(&self, word: &str, out: &mut Vec<u32>) {
        let chars: Vec<(usize, char)> = word.char_indices().collect();
        let n = chars.len();
        let byte_at = |i: usize| if i == n { word.len() } else { chars[i].0 };
        // best[i]: score and (start, id) of the last piece of the best path over chars[..i].
        let mut best: Vec<(f32, usize, u32)> = vec![(f32::NEG_INFINITY, 0, 0); n + 1];
        best[0].0 = 0.0;
        for start in 0..n {
            let base = best[start].0;
            if base == f32::NEG_INFINITY {
                continue;
            }
            let mut single = false;
            for len in 1..=self.max_piece_chars.min(n - start) {
                if let Some(&(id, score)) = self.pieces.get(&word[byte_at(start)..byte_at(start + len)]) {
                    single |= len == 1;
                    if base + score > best[start + len].0 {
                        best[start + len] = (base + score, start, id);
                    }
                }
            }
            if !single && base + self.unk_score > best[start + 1].0 {
                best[start + 1] = (base + self.unk_score, start, self.unk);
            }
        }
        let mut ids = Vec::new();
        let mut end = n;
        while end > 0 {
            let (_, start, id) = best[end];
            ids.push(id);
            end = start;
        }
        ids.reverse();
        for id in ids {
            // Runs of unknown characters become one <unk>, as the library merges them.
            if !(id == self.unk && out.last() == Some(&self.unk)) {
                out.push(id);
            }
        }
    }

    /// Piece ids of `text`, without the end token.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for word in self.words(text) {
            self.viterbi(&word, &mut ids);
        }
        ids
    }

    /// `max_len` ids as the UMT5 tokenizer gives them (text truncated to leave room for
    /// `</s>`, then padding) and the count of real tokens (the attention mask's ones).
    pub fn encode_padded(&self, text: &str, max_len: usize) -> (Vec<u32>, usize) {
        let mut ids = self.encode_text(text);
        ids.truncate(max_len.saturating_sub(1));
        ids.push(self.eos);
        ids.truncate(max_len);
        let len = ids.len();
        ids.resize(max_len, self.pad);
        (ids, len)
    }
}
