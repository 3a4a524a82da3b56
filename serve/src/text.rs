//! Generated tokens to text as a client should see it: printable pieces as they become
//! whole characters, cut at the first stop sequence, and never showing the start of a
//! stop sequence that may still complete.

use lemur_worker::tokenizer::Tok;
use lemur_worker::WorkerError;

/// The text of one request's output so far.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    stops: Vec<String>,
    /// Text handed out so far (bytes of the decoded output).
    sent: usize,
    stopped: bool,
}

/// What a new token adds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Piece {
    /// Text that can be shown now.
    pub text: String,
    /// A stop sequence appeared: the output ends before it.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, ..Self::default() }
    }

    /// Adds a token (the stop tokens are not text: leave them out).
    pub fn push(&mut self, tok: &Tok, id: u32) -> Result<Piece, WorkerError> {
        if self.stopped {
            return Ok(Piece { text: String::new(), stopped: true });
        }
        self.ids.push(id);
        let full = tok.decode(&self.ids)?;
        Ok(self.advance(&full, false))
    }

    /// The end of the output: whatever was held back.
    pub fn finish(&mut self, tok: &Tok) -> Result<String, WorkerError> {
        if self.stopped {
            return Ok(String::new());
        }
        let full = tok.decode(&self.ids)?;
        Ok(self.advance(&full, true).text)
    }

    /// The new text of `full` (everything decoded so far) that is safe to show.
    fn advance(&mut self, full: &str, last: bool) -> Piece {
        // Search a little before what was sent: a stop may straddle pieces.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !full.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stops.iter().filter_map(|s| full[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(cut) = hit {
            self.stopped = true;
            let text = full.get(self.sent..cut.max(self.sent)).unwrap_or_default().to_string();
            self.sent = cut.max(self.sent);
            return Piece { text, stopped: true };
        }
        // An incomplete character waits for the next token (at the end it is shown).
        let mut end = full.len();
        if !last {
            if full.ends_with('\u{fffd}') {
                return Piece::default();
            }
            // Hold back a tail that begins some stop sequence.
            let hold = self
                .stops
                .iter()
                .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k) && full.ends_with(&s[..k])))
                .max()
                .unwrap_or(0);
            end -= hold;
        }
        if end <= self.sent || !full.is_char_boundary(end) || !full.is_char_boundary(self.sent) {
            return Piece::default();
        }
        let text = full[self.sent..end].to_string();
        self.sent = end;
        Piece { text, stopped: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds growing decoded texts directly.
    fn run(stops: &[&str], texts: &[&str]) -> (Vec<String>, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        let mut stopped = false;
        for (i, t) in texts.iter().enumerate() {
            let p = s.advance(t, i + 1 == texts.len());
            out.push(p.text);
            if p.stopped {
                stopped = true;
                break;
            }
        }
        (out, stopped)
    }

    #[test]
    fn pieces_join_to_the_text_and_stop_where_the_stop_begins() {
        let (out, stopped) = run(&[], &["Hel", "Hello", "Hello wor", "Hello world"]);
        assert_eq!(out.concat(), "Hello world");
        assert!(!stopped);
        // A stop split over two tokens: "EN" then "D".
        let (out, stopped) = run(&["END"], &["ab", "abEN", "abEND", "abENDcd"]);
        assert_eq!(out.concat(), "ab");
        assert!(stopped);
        assert_eq!(out, ["ab", "", ""]);
        // A held-back prefix that did not become a stop is shown after all.
        let (out, _) = run(&["END"], &["ab", "abE", "abEx"]);
        assert_eq!(out, ["ab", "", "Ex"]);
        // Held back at the end of the output: shown.
        let (out, _) = run(&["END"], &["ab", "abE"]);
        assert_eq!(out.concat(), "abE");
        // The earliest of several stops wins.
        let (out, _) = run(&["c", "b"], &["xabc"]);
        assert_eq!(out.concat(), "xa");
        // An incomplete character waits.
        let (out, _) = run(&[], &["a\u{fffd}", "aé"]);
        assert_eq!(out, ["", "aé"]);
    }
}
