//! The JSB Chorales benchmark, teacher-forced, by exactly the protocol of the model card and
//! `models/train/evaluate.py`: each piece is BOS + its raster S, A, T, B tokens; every token after
//! BOS is scored once as -ln p; the conditioning is the card's evaluation vector (everything
//! unknown, style chorale) at every position; pieces longer than the context are scored in
//! windows that each start a fresh pass. The Rust figure must match the Python one within 0.002,
//! so the windows and the log-softmax (in f64) are the same arithmetic.

use std::path::Path;

use super::card::Card;
use super::runtime::{Cache, Net};
use super::ModelError;

/// `common.eval_windows`: (start, end, first scored target) for a sequence of length `len`.
pub fn eval_windows(len: usize, ctx: usize) -> Vec<(usize, usize, usize)> {
    if len <= ctx {
        return vec![(0, len, 1)];
    }
    let stride = ctx / 2;
    let mut out = Vec::new();
    let mut scored = 1;
    let mut s = 0;
    while s + ctx < len {
        out.push((s, s + ctx, scored));
        scored = s + ctx;
        s += stride;
    }
    out.push((len - ctx, len, scored));
    out
}

/// A piece as the model reads it: BOS, then per step the S, A, T, B tokens.
pub fn piece_sequence(card: &Card, grid: &[[i64; 4]]) -> (Vec<i64>, Vec<i64>) {
    let mut tokens = vec![card.vocabulary.bos];
    let mut voices = vec![card.voices.start_id];
    for step in grid {
        for (v, &t) in step.iter().enumerate() {
            tokens.push(t);
            voices.push(v as i64);
        }
    }
    (tokens, voices)
}

/// (start, end, first scored target) of one evaluation window.
pub type Window = (usize, usize, usize);

/// Scores one sequence; returns (total nats, scored tokens, windows).
pub fn score_sequence(
    net: &mut Net,
    card: &Card,
    tokens: &[i64],
    voices: &[i64],
    cond: &[f32],
) -> Result<(f64, usize, Vec<Window>), ModelError> {
    let windows = eval_windows(tokens.len(), card.context_length);
    let vocab = card.vocabulary.size;
    let (mut total, mut count) = (0.0f64, 0usize);
    for &(s, e, first) in &windows {
        let conds: Vec<f32> = cond
            .iter()
            .copied()
            .cycle()
            .take((e - s) * cond.len())
            .collect();
        let mut cache = Cache::empty();
        let logits = net.forward(&tokens[s..e], &voices[s..e], &conds, &mut cache)?;
        for j in first.max(1)..e {
            let row = &logits[(j - s - 1) * vocab..(j - s) * vocab];
            let max = row
                .iter()
                .map(|&x| x as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let lse = row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            total += lse - row[tokens[j] as usize] as f64;
            count += 1;
        }
    }
    Ok((total, count, windows))
}

/// The JSB file's split as token grids (pitches rounded; negative = silence).
pub fn load_jsb(path: &Path, split: &str, card: &Card) -> Result<Vec<Vec<[i64; 4]>>, ModelError> {
    let bad = |message: String| ModelError::Data {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let pieces = json.get(split).and_then(|s| s.as_array()).ok_or_else(|| {
        bad(format!(
            "no split {split:?} (expected train, valid or test)"
        ))
    })?;
    let mut out = Vec::with_capacity(pieces.len());
    for (pi, piece) in pieces.iter().enumerate() {
        let steps = piece
            .as_array()
            .ok_or_else(|| bad(format!("{split}[{pi}] is not a list of steps")))?;
        let mut grid = Vec::with_capacity(steps.len());
        for (si, step) in steps.iter().enumerate() {
            let cells = step
                .as_array()
                .filter(|c| c.len() == 4)
                .ok_or_else(|| bad(format!("{split}[{pi}][{si}] is not 4 voices")))?;
            let mut row = [0i64; 4];
            for (v, cell) in cells.iter().enumerate() {
                let x = cell
                    .as_f64()
                    .ok_or_else(|| bad(format!("{split}[{pi}][{si}][{v}] is not a number")))?;
                let p = x.round() as i64;
                row[v] = if p < 0 {
                    card.vocabulary.silence
                } else {
                    u8::try_from(p)
                        .ok()
                        .and_then(|p| card.pitch_token(p))
                        .ok_or_else(|| {
                            bad(format!("{split}[{pi}][{si}][{v}]: pitch {p} is outside the model's vocabulary"))
                        })?
                };
            }
            grid.push(row);
        }
        out.push(grid);
    }
    Ok(out)
}

/// Mean NLL per token over `pieces` (the first `limit` when given).
pub fn score_split(
    net: &mut Net,
    card: &Card,
    pieces: &[Vec<[i64; 4]>],
) -> Result<(f64, usize), ModelError> {
    let cond = card.conditioning.eval_vector.clone();
    let (mut total, mut count) = (0.0, 0);
    for grid in pieces {
        let (tokens, voices) = piece_sequence(card, grid);
        let (t, c, _) = score_sequence(net, card, &tokens, &voices, &cond)?;
        total += t;
        count += c;
    }
    Ok((total / count.max(1) as f64, count))
}

#[cfg(test)]
mod tests {
    use super::eval_windows;

    #[test]
    fn windows_score_every_target_once() {
        for len in [5, 384, 385, 576, 577, 913, 2000] {
            let w = eval_windows(len, 384);
            let mut next = 1;
            for &(s, e, f) in &w {
                assert!(e - s <= 384 && f > s && f <= e);
                assert_eq!(f, next);
                next = e;
            }
            assert_eq!(next, len);
        }
        // The fixture's first piece: 913 tokens.
        assert_eq!(
            eval_windows(913, 384),
            vec![
                (0, 384, 1),
                (192, 576, 384),
                (384, 768, 576),
                (529, 913, 768)
            ]
        );
    }
}
