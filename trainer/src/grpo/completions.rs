//! TRL's `log_completions`: a sample of (prompt, completion, reward, advantage) rows of
//! a step, printed at logging steps. Pure text formatting; the loop decides when.

use crate::data::PromptExample;
use crate::rollout::RolloutGroup;

/// The rows of this rank's groups: `mine[g]` is the prompt of `groups[g]`; `rewards` and
/// `adv` hold `num_generations` values per group, in order.
pub fn completion_rows<'a>(
    prompts: &'a [PromptExample],
    mine: &[usize],
    groups: &'a [RolloutGroup],
    rewards: &[f64],
    adv: &[f64],
) -> Vec<CompletionRow<'a>> {
    let mut rows = Vec::new();
    let mut i = 0;
    for (g, group) in groups.iter().enumerate() {
        for c in &group.completions {
            rows.push(CompletionRow {
                prompt: &prompts[mine[g]].prompt_text,
                completion: &c.text,
                reward: rewards[i],
                advantage: adv[i],
            });
            i += 1;
        }
    }
    rows
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompletionRow<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    pub reward: f64,
    pub advantage: f64,
}

/// The first `limit` rows (all when `None`, TRL's `num_completions_to_print`), each with
/// its full prompt and completion text.
pub fn completions_table(step: u64, rows: &[CompletionRow<'_>], limit: Option<usize>) -> String {
    let n = limit.unwrap_or(rows.len()).min(rows.len());
    let mut out = format!("completions at step {step} ({n} of {}):\n", rows.len());
    for (i, r) in rows.iter().take(n).enumerate() {
        out.push_str(&format!(
            "--- [{}] reward {:.4} | advantage {:+.4}\n[prompt]\n{}\n[completion]\n{}\n",
            i + 1,
            r.reward,
            r.advantage,
            r.prompt,
            r.completion
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_the_first_rows_in_full() {
        let rows = [
            CompletionRow {
                prompt: "What is 2+2?",
                completion: "<think>2+2</think> 4",
                reward: 1.0,
                advantage: 0.5,
            },
            CompletionRow {
                prompt: "What is 2+2?",
                completion: "5",
                reward: 0.0,
                advantage: -0.5,
            },
        ];
        let t = completions_table(3, &rows, Some(1));
        assert!(t.starts_with("completions at step 3 (1 of 2):\n"), "{t}");
        assert!(t.contains("reward 1.0000 | advantage +0.5000"), "{t}");
        assert!(
            t.contains("<think>2+2</think> 4") && !t.contains("\n5\n"),
            "{t}"
        );
        assert_eq!(
            completions_table(3, &rows, None)
                .matches("[completion]")
                .count(),
            2
        );
    }
}
