//! Training data: a JSONL file, one document a line (`text`, tokenised by the model's
//! tokenizer and ended with its end-of-sequence token, or `input_ids`), packed into
//! sequences of a fixed width: documents joined and cut into consecutive windows, no
//! padding (what PEFT's and most trainers' packing does).

use std::path::Path;

use crate::error::WorkerError;
use crate::tokenizer::Tok;

fn line_err(path: &Path, line: usize, message: impl Into<String>) -> WorkerError {
    WorkerError::File { path: format!("{}:{line}", path.display()), message: message.into() }
}

/// Token ids of one JSONL line (1-based `line` for errors), or `None` for a blank line.
fn line_ids(path: &Path, line: usize, text: &str, tok: Option<&Tok>) -> Result<Option<Vec<u32>>, WorkerError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| line_err(path, line, format!("not JSON: {e}")))?;
    if let Some(ids) = v.get("input_ids") {
        let ids = ids.as_array().ok_or_else(|| line_err(path, line, "`input_ids` must be a list of token ids"))?;
        let out = ids
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| line_err(path, line, format!("`input_ids` holds {x}, not a token id")))
            })
            .collect::<Result<_, _>>()?;
        return Ok(Some(out));
    }
    if let Some(t) = v.get("text") {
        let t = t.as_str().ok_or_else(|| line_err(path, line, "`text` must be a string"))?;
        let tok = tok.ok_or_else(|| line_err(path, line, "`text` needs the model's tokenizer"))?;
        let mut ids = tok.encode(t)?;
        ids.extend(tok.eos);
        return Ok(Some(ids));
    }
    Err(line_err(path, line, "each line needs `text` or `input_ids`"))
}

/// Packs the documents of `text` (the file at `path`) into sequences of `width` tokens;
/// the tail shorter than `width` is dropped.
pub fn pack(path: &Path, text: &str, width: usize, tok: Option<&Tok>) -> Result<Vec<Vec<u32>>, WorkerError> {
    if width == 0 {
        return Err(WorkerError::Plan("training sequences need a width of at least one token".into()));
    }
    let mut stream: Vec<u32> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(ids) = line_ids(path, i + 1, line, tok)? {
            stream.extend(ids);
        }
    }
    Ok(stream.chunks_exact(width).map(<[u32]>::to_vec).collect())
}

/// Reads and packs a JSONL file (see [`pack`]).
pub fn read_sequences(path: &Path, width: usize, tok: Option<&Tok>) -> Result<Vec<Vec<u32>>, WorkerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| WorkerError::File { path: path.display().to_string(), message: e.to_string() })?;
    pack(path, &text, width, tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_joined_and_cut_into_windows() {
        let p = Path::new("data.jsonl");
        let text = "{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": [4, 5]}\n{\"input_ids\": [6, 7, 8, 9]}\n";
        let seqs = pack(p, text, 4, None).unwrap();
        assert_eq!(seqs, vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]], "the tail (9) is dropped");
        assert!(pack(p, text, 0, None).is_err());
    }

    #[test]
    fn bad_lines_are_named_with_their_line_number() {
        let p = Path::new("data.jsonl");
        // (file, what the error must say)
        let cases = [
            ("{\"input_ids\": [1]}\nnot json\n", "data.jsonl:2: not JSON"),
            ("{\"input_ids\": [1, -2]}\n", "data.jsonl:1: `input_ids` holds -2"),
            ("{\"input_ids\": [4294967296]}\n", "holds 4294967296, not a token id"),
            ("{\"input_ids\": \"1 2\"}\n", "must be a list"),
            ("{\"text\": 3}\n", "`text` must be a string"),
            ("{\"text\": \"hello\"}\n", "needs the model's tokenizer"),
            ("\n{\"prompt\": \"x\"}\n", "data.jsonl:2: each line needs `text` or `input_ids`"),
        ];
        for (text, says) in cases {
            let e = pack(p, text, 2, None).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        let e = read_sequences(Path::new("/missing/data.jsonl"), 2, None).unwrap_err().to_string();
        assert!(e.contains("/missing/data.jsonl"), "{e}");
    }
}
