//! Hand-written checker cases by category (the corpus test covers agreement with math-verify;
//! these pin the behaviour the rewards and `trainer eval` rely on).

use verify::check;

fn yes(gold: &str, pred: &str) {
    assert!(
        check(gold, pred),
        "expected equivalent: gold {gold:?} pred {pred:?}"
    );
}

fn no(gold: &str, pred: &str) {
    assert!(
        !check(gold, pred),
        "expected different: gold {gold:?} pred {pred:?}"
    );
}

#[test]
fn numbers_fractions_and_rounding() {
    yes("$\\frac{1}{2}$", "\\boxed{0.5}");
    yes("$0.5$", "$\\dfrac{1}{2}$");
    yes("$1000000$", "\\boxed{1,000,000}");
    yes("$1.5$", "$1\\frac{1}{2}$");
    yes("$\\frac{1}{3}$", "$0.333333$");
    no("$\\frac{1}{3}$", "$0.33$");
    no("$100$", "$99.9999999$");
    yes("$-3$", "\\boxed{-3}");
    no("$-3$", "\\boxed{3}");
    yes("2.74", "Soit 2,74 au total");
}

#[test]
fn expressions_roots_and_constants() {
    yes("$2\\sqrt{3}$", "$\\sqrt{12}$");
    yes("$\\frac{\\sqrt{2}}{2}$", "$\\frac{1}{\\sqrt{2}}$");
    yes("$\\frac{1}{2}$", "$\\sin\\frac{\\pi}{6}$");
    yes("$x^2+2x+1$", "\\boxed{(x+1)^2}");
    no("$x^2+2x+1$", "\\boxed{(x-1)^2}");
    yes("$\\pi$", "$3.141593$");
    no("$\\pi$", "$3.14$");
    yes("$2^{10}$", "\\boxed{1024}");
}

#[test]
fn sets_intervals_tuples_matrices() {
    yes("$\\{1,2,3\\}$", "$\\{3,1,2\\}$");
    no("$\\{1,2,3\\}$", "$\\{1,2\\}$");
    yes("$[0,1)$", "$[0, 1)$");
    no("$[0,1)$", "$[0, 1]$");
    yes(
        "$(-\\infty,-1)\\cup(1,\\infty)$",
        "$(1,\\infty)\\cup(-\\infty,-1)$",
    );
    yes("$(2,3)$", "$(2, 3)$");
    no("$(2,3)$", "$(3, 2)$");
    yes(
        "$\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}$",
        "$\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}$",
    );
    no(
        "$\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}$",
        "$\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}$",
    );
    yes("$1, 4$", "The roots are $\\boxed{1}$ and $\\boxed{4}$.");
    yes("$\\{-2, 2\\}$", "$\\pm 2$");
}

#[test]
fn equations_relations_units_percent_text() {
    yes("$x=3$", "$3$");
    yes("$3$", "$x=3$");
    no("$x=3$", "$y=3$");
    yes("$y=2x+1$", "$y=1+2x$");
    yes("$x>3$", "$3<x$");
    yes("$x>3$", "$(3,\\infty)$");
    yes("$5$", "\\boxed{5\\text{ cm}}");
    yes("$25\\%$", "$25$");
    yes("$25\\%$", "$0.25$");
    yes("$\\text{(C)}$", "\\boxed{C}");
    yes("$\\text{Evelyn}$", "$\\boxed{\\text{Evelyn}}$");
    no("$\\text{Evelyn}$", "$\\boxed{\\text{Carla}}$");
}

#[test]
fn extraction_order_and_bounds() {
    yes("$5$", "I first thought 4, but the answer is \\boxed{5}.");
    no("$4$", "I first thought 4, but the answer is \\boxed{5}.");
    yes("$7$", "<think>3+4</think><answer>7</answer>");
    yes("$7$", "<think>3+4=7</think><answer>7");
    no("$8$", "<think>3+5=8</think><answer>7</answer>");
    no("$7$", "no answer here");
    // Oversized and deeply nested inputs are refused quickly, never a panic.
    let deep = format!("${}1{}$", "(".repeat(5000), ")".repeat(5000));
    no("$1$", &deep);
    let long = format!("\\boxed{{{}}}", "1+".repeat(10_000) + "1");
    no("$1$", &long);
    no("$1$", "\\boxed{10^{10^{10}}}");
    no("$1$", "\\boxed{1000!}");
}
