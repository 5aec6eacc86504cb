//! Incremental detokenization (vLLM's `detokenize_incrementally`, TGI's `decode_token`).
//!
//! Decoding every token of a completion again after each new token is quadratic in its
//! length. [`IncrementalDecoder`] instead decodes a small window: the tokens from
//! `prefix_offset` to `read_offset` (already returned, kept as context so that decoders
//! which strip a leading space or merge pieces see the same neighbours) and the tokens
//! after `read_offset` (not yet returned). The new text is the second decode minus the
//! first; it is held back while it ends in U+FFFD, the decoding of a multi-byte character
//! whose bytes are split across tokens. [`StopScan`] accumulates the text and finds the
//! earliest stop string, searching only where a new one can start.
use model::tokenizer::{Tokenizer, TokenizerError};

/// The window offsets into a completion's (append-only) tokens.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
    /// The decoding of the tokens after `read_offset` while it is held back.
    held: String,
}

impl IncrementalDecoder {
    /// The text that `tokens` (all of the completion's tokens so far; earlier calls saw a
    /// prefix of them) adds to what earlier calls returned; empty while it is held back.
    pub fn step(&mut self, tok: &Tokenizer, tokens: &[i64]) -> Result<String, TokenizerError> {
        let (prefix, new) = self.window(tok, tokens)?;
        match new.get(prefix.len()..) {
            Some(delta) if new.len() > prefix.len() && !new.ends_with('\u{FFFD}') => {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = tokens.len();
                self.held.clear();
                Ok(delta)
            }
            rest => {
                self.held = rest.unwrap_or_default().to_string();
                Ok(String::new())
            }
        }
    }

    /// The held-back text after the last step: what a full decode currently adds to the
    /// returned text (a trailing incomplete character as U+FFFD). A run of bytes that
    /// never forms valid UTF-8 stays held (and its window grows) until a valid character
    /// follows or the completion ends, as in vLLM.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// The held-back rest at the end of the completion (an incomplete character as U+FFFD,
    /// as a full decode gives it).
    pub fn flush(&mut self, tok: &Tokenizer, tokens: &[i64]) -> Result<String, TokenizerError> {
        let (prefix, new) = self.window(tok, tokens)?;
        self.prefix_offset = tokens.len();
        self.read_offset = tokens.len();
        self.held.clear();
        Ok(new.get(prefix.len()..).unwrap_or_default().to_string())
    }

    fn window(&self, tok: &Tokenizer, tokens: &[i64]) -> Result<(String, String), TokenizerError> {
        let ids: Vec<u32> = tokens[self.prefix_offset.min(tokens.len())..]
            .iter()
            .map(|&t| t as u32)
            .collect();
        let read = self.read_offset - self.prefix_offset;
        let prefix = tok.decode(&ids[..read.min(ids.len())], true)?;
        let new = tok.decode(&ids, true)?;
        Ok((prefix, new))
    }
}

/// A completion's text so far and the earliest stop string in it.
#[derive(Debug, Clone)]
pub struct StopScan {
    text: String,
    /// The longest stop string, in bytes.
    longest: usize,
    /// The byte offset of the earliest stop string and its index in the stop list.
    found: Option<(usize, usize)>,
}

impl StopScan {
    pub fn new(stop: &[String]) -> Self {
        Self {
            text: String::new(),
            longest: stop.iter().map(String::len).max().unwrap_or(0),
            found: None,
        }
    }

    /// Appends `delta`; returns the byte offset of the earliest stop string in the text
    /// followed by `held` (the decoder's held-back tail, which a full decode of the tokens
    /// so far ends with; the offset may lie in it). Only the last `longest - 1` old bytes,
    /// `delta` and `held` are searched: an occurrence that ends in the old text was found
    /// by an earlier call.
    pub fn push(&mut self, delta: &str, held: &str, stop: &[String]) -> Option<usize> {
        if self.found.is_some() || (delta.is_empty() && held.is_empty()) {
            self.text.push_str(delta);
            return self.stop_at();
        }
        let mut from = self
            .text
            .len()
            .saturating_sub(self.longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(delta);
        let joined;
        let tail = if held.is_empty() {
            &self.text[from..]
        } else {
            joined = [&self.text[from..], held].concat();
            &joined
        };
        self.found = stop
            .iter()
            .enumerate()
            .filter_map(|(i, s)| tail.find(s.as_str()).map(|at| (from + at, i)))
            .min();
        self.stop_at()
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The byte offset of the earliest stop string found.
    pub fn stop_at(&self) -> Option<usize> {
        self.found.map(|(at, _)| at)
    }

    /// The earliest stop string found.
    pub fn matched<'a>(&self, stop: &'a [String]) -> Option<&'a str> {
        self.found
            .and_then(|(_, i)| stop.get(i))
            .map(String::as_str)
    }

    /// How much of the text can be sent to a client: up to the stop string once one is
    /// found, else all but the last `longest - 1` bytes (they may begin a stop string).
    pub fn safe_end(&self) -> usize {
        let hold = self.longest.saturating_sub(1);
        let mut end = self.stop_at().map_or_else(
            || self.text.len().saturating_sub(hold),
            |at| at.min(self.text.len()),
        );
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tokenizer() -> Tokenizer {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated/qwen2-tiny");
        Tokenizer::from_dir(dir).expect("the qwen2-tiny fixture (scripts/prepare.sh)")
    }

    fn full(tok: &Tokenizer, tokens: &[i64]) -> String {
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        tok.decode(&ids, true).unwrap()
    }

    /// Streams `tokens` one at a time; returns the deltas (the flush last).
    fn stream(tok: &Tokenizer, tokens: &[i64]) -> Vec<String> {
        let mut d = IncrementalDecoder::default();
        let mut out: Vec<String> = (1..=tokens.len())
            .map(|n| d.step(tok, &tokens[..n]).unwrap())
            .collect();
        out.push(d.flush(tok, tokens).unwrap());
        out
    }

    #[test]
    fn multi_byte_characters_split_across_tokens_stream_whole() {
        let tok = tokenizer();
        // Multi-byte characters that the byte-level BPE splits into several tokens.
        let text = "naïve café 日本語 😀🎉 ok ∑x²";
        let ids: Vec<i64> = tok
            .encode(text, false)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let split = ids
            .iter()
            .filter(|&&t| full(&tok, &[t]).contains('\u{FFFD}'))
            .count();
        assert!(
            split > 0,
            "no token of {text:?} splits a character: {ids:?}"
        );
        let deltas = stream(&tok, &ids);
        assert_eq!(deltas.concat(), text);
        assert_eq!(deltas.concat(), full(&tok, &ids));
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    }

    #[test]
    fn arbitrary_token_sequences_concatenate_to_the_full_decode() {
        let tok = tokenizer();
        let vocab = tok.vocab_size() as u64;
        // Splitting tokens (alone they decode to U+FFFD) mixed with others, so that
        // incomplete and invalid byte sequences occur, as sampling from a random model gives.
        let splitting: Vec<i64> = (0..vocab as i64)
            .filter(|&t| full(&tok, &[t]).contains('\u{FFFD}'))
            .collect();
        assert!(splitting.len() > 10, "{}", splitting.len());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20 {
            let tokens: Vec<i64> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x.is_multiple_of(3) {
                        splitting[(x / 3 % splitting.len() as u64) as usize]
                    } else {
                        (x / 3 % vocab) as i64
                    }
                })
                .collect();
            assert_eq!(
                stream(&tok, &tokens).concat(),
                full(&tok, &tokens),
                "{tokens:?}"
            );
        }
    }

    #[test]
    fn stop_strings_are_found_across_deltas_and_held_back() {
        let stop = vec!["END".to_string(), "日本".to_string()];
        let mut s = StopScan::new(&stop);
        assert_eq!(s.push("abc E", "", &stop), None);
        // "E" may begin "END"; "日本" is 6 bytes: 5 are held back.
        assert_eq!(s.safe_end(), 0);
        assert_eq!(s.push("N", "", &stop), None);
        assert_eq!(s.push("D and more END", "", &stop), Some(4));
        assert_eq!(s.safe_end(), 4);
        assert_eq!(s.push("x", "", &stop), Some(4));
        let mut s = StopScan::new(&stop);
        assert_eq!(s.push("a日", "", &stop), None);
        assert_eq!(s.safe_end(), 0);
        assert_eq!(s.push("本", "", &stop), Some(1));
        let mut s = StopScan::new(&[]);
        assert_eq!(s.push("abc", "", &[]), None);
        assert_eq!(s.safe_end(), 3);
        // A stop string ending in the held-back tail (as a full decode shows it) counts,
        // but nothing past the text itself is offered.
        let stop = vec!["b\u{FFFD}".to_string()];
        let mut s = StopScan::new(&stop);
        assert_eq!(s.push("ab", "\u{FFFD}", &stop), Some(1));
        assert_eq!(s.matched(&stop), Some("b\u{FFFD}"));
        assert_eq!(s.safe_end(), 1);
        let mut s = StopScan::new(&stop);
        assert_eq!(s.push("ab", "", &stop), None);
        assert_eq!(s.safe_end(), 0);
        assert_eq!(s.push("", "\u{FFFD}", &stop), Some(1));
        // Compare with a full search at every step.
        let text = "xx ENDEN END 日本語";
        let mut s = StopScan::new(&stop);
        for (i, c) in text.char_indices() {
            let got = s.push(&c.to_string(), "", &stop);
            let want = stop
                .iter()
                .filter_map(|p| text[..i + c.len_utf8()].find(p.as_str()))
                .min();
            assert_eq!(got, want, "{i}");
        }
    }
}
