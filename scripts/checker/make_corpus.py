"""Builds the answer-checker agreement corpus by running math-verify itself.

Every (gold, prediction) pair below was written for this corpus (none is taken from
math-verify's tests). Each is scored by math-verify 0.9.0 configured as the checker is: both
sides parsed with `[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]`
(the last \\boxed first, then LaTeX spans and plain numbers), compared with `verify(...,
float_rounding=6)`. The verdicts go to verify/tests/data/math_verify_corpus.jsonl, which the
Rust test `verify/tests/agreement.rs` compares against.

    .venv/bin/python scripts/checker/make_corpus.py   # needs math-verify==0.9.0 (requirements.txt)
"""

import json
import pathlib
import sys

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
OUT = pathlib.Path(__file__).resolve().parents[2] / "verify/tests/data/math_verify_corpus.jsonl"


def box(s):
    return "The answer is $\\boxed{" + s + "}$."


def pairs():
    P = []

    def delimited(s):
        return any(d in s for d in ("$", "\\(", "\\[", "\\boxed"))

    def add(cat, gold, preds):
        # Plain LaTeX is only read inside math delimiters, so each undelimited prediction is
        # scored as written and inside `$...$` (numbers and prose keep both forms).
        for p in preds:
            if delimited(p):
                P.append((cat, gold, p))
                continue
            if cat in ("number", "completion", "units", "percent", "rounding", "gold_solution"):
                P.append((cat, gold, p))
            P.append((cat, gold, "$" + p + "$"))

    # Plain numbers: integers, decimals, separators, signs, currency, leading zeros.
    add("number", "42", ["42", "42.0", "$42$", "\\boxed{42}", "41", "-42", "forty-two", "0042", "42.000001", "4.2"])
    add("number", "-7", ["-7", "$-7$", "\\boxed{-7}", "7", "\\boxed{- 7}", "-7.0", "−7"])
    add("number", "3.75", ["3.75", "$3.75$", "\\frac{15}{4}", "$\\frac{15}{4}$", "3,75", "3.750", "3.7", "3.749999", "3.7500001", "375/100"])
    add("number", "1000000", ["1,000,000", "1 000 000", "$1{,}000{,}000$", "\\boxed{1,000,000}", "10^6", "$10^{6}$", "100000", "1,000,001"])
    add("number", "0.125", ["\\frac{1}{8}", "1/8", ".125", "0.1250", "12.5\\%", "0.12", "\\boxed{\\dfrac18}"])
    add("number", "12", ["The total is 12 apples.", "So we get $x = 12$.", "We need 12 cm.", "12 dollars", "$12$ meters", "It is 13.", "$\\$12$", "12."])
    add("number", "2024", ["2024", "2,024", "\\boxed{2024}", "2023", "\\boxed{2\\,024}"])
    add("number", "0", ["0", "$0$", "\\boxed{0}", "0.0", "-0", "\\boxed{0.000001}", "\\boxed{1}"])
    add("number", "$1.5$", ["1,5", "\\frac{3}{2}", "3/2", "1\\frac{1}{2}", "1.50", "1.55"])
    add("number", "\\boxed{5}", ["I think it's $5$", "\\boxed{5}", "\\boxed{6}", "\\boxed{5.0}", "five"])

    # Fractions and rationals.
    add("fraction", "$\\frac{2}{3}$", ["\\frac{2}{3}", "$\\dfrac{2}{3}$", "2/3", "$\\frac{4}{6}$", "0.666667", "0.6667", "0.67", "\\frac{3}{2}", "\\tfrac23", "$\\frac23$", "\\boxed{\\frac{2}{3}}"])
    add("fraction", "$-\\frac{5}{12}$", ["-\\frac{5}{12}", "\\frac{-5}{12}", "-5/12", "$\\frac{5}{-12}$", "\\frac{5}{12}", "-0.416667", "-0.4167"])
    add("fraction", "$\\frac{22}{7}$", ["\\frac{22}{7}", "3\\frac{1}{7}", "3.142857", "\\pi", "3.14", "\\frac{44}{14}"])
    add("fraction", "$\\frac{1}{3}$", ["0.333333", "0.3333333333", "0.33", "\\frac{2}{6}", "1:3", "\\frac{1}{3}", "$\\frac{10}{30}$"])

    # Roots, powers, pi, e, trigonometric and logarithmic constants.
    add("radical", "$\\sqrt{2}$", ["\\sqrt{2}", "$\\sqrt2$", "2^{1/2}", "$\\frac{2}{\\sqrt{2}}$", "1.414214", "1.4142", "\\sqrt{3}", "\\sqrt{4}/\\sqrt{2}", "$\\sqrt[2]{2}$"])
    add("radical", "$2\\sqrt{3}$", ["2\\sqrt{3}", "\\sqrt{12}", "$\\sqrt{12}$", "\\frac{6}{\\sqrt{3}}", "3.464102", "3\\sqrt{2}", "2 \\sqrt 3", "\\sqrt{3}\\cdot 2"])
    add("radical", "$\\frac{\\sqrt{2}}{2}$", ["\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt2}{2}", "0.707107", "0.7071", "\\sin(\\pi/4)", "\\cos\\frac{\\pi}{4}", "\\frac{\\sqrt{3}}{2}", "\\sqrt{\\frac{1}{2}}"])
    add("radical", "$3+2\\sqrt{2}$", ["2\\sqrt{2}+3", "(1+\\sqrt{2})^2", "3+\\sqrt{8}", "5.828427", "3-2\\sqrt{2}", "3+2\\sqrt{3}"])
    add("radical", "$\\sqrt[3]{2}$", ["2^{1/3}", "\\sqrt[3]{2}", "1.259921", "\\sqrt{2}", "2^{\\frac{1}{3}}"])
    add("pi", "$2\\pi$", ["2\\pi", "\\pi \\cdot 2", "6.283185", "6.28", "\\frac{4\\pi}{2}", "\\pi", "360", "2 \\pi r"])
    add("pi", "$\\frac{\\pi}{3}$", ["\\frac{\\pi}{3}", "\\pi/3", "1.047198", "60", "\\frac{2\\pi}{6}", "\\frac{\\pi}{6}", "60^\\circ"])
    add("pi", "$36\\pi$", ["36\\pi", "$36 \\pi$", "113.097336", "113.1", "6^2\\pi", "18\\pi", "\\pi 36"])
    add("power", "$2^{10}$", ["1024", "2^{10}", "4^5", "$1024$", "1023", "2^{9}", "2**10"])
    add("power", "$e^{2}$", ["e^2", "e^{2}", "7.389056", "\\exp(2)", "2e", "e^{3}"])
    add("log", "$\\log_2 8$", ["3", "\\log_{2}8", "\\frac{\\ln 8}{\\ln 2}", "2", "\\log_2{8}"])
    add("log", "$\\ln 2$", ["\\ln 2", "\\ln(2)", "0.693147", "\\log 2", "\\ln 4 / 2", "\\ln 3"])
    add("trig", "$\\frac{1}{2}$", ["\\sin 30^\\circ", "\\cos(\\pi/3)", "\\sin\\frac{\\pi}{6}", "0.5", "\\frac{\\sqrt{3}}{2}", "\\tan(\\pi/4)"])

    # Percentages.
    add("percent", "$25\\%$", ["25\\%", "25%", "25 percent", "$25$", "25", "0.25", "\\frac{1}{4}", "$\\boxed{25\\%}$", "26\\%", "2.5\\%", "25 pct"])
    add("percent", "$12.5\\%$", ["12.5\\%", "12.5", "0.125", "\\frac{1}{8}", "12.5 percent", "12\\%", "12.50\\%"])
    add("percent", "40", ["40\\%", "$40\\%$", "40 percent", "0.4", "40.0", "\\boxed{40\\%}", "4\\%"])
    add("percent", "$0.3$", ["30\\%", "30", "0.30", "\\frac{3}{10}", "3/10", "0.03"])

    # Units and text around numbers.
    add("units", "$5$", ["5 \\text{ cm}", "$5\\text{ meters}$", "\\boxed{5 \\text{ km}}", "5\\ \\text{inches}", "5 \\mbox{ feet}", "5 \\mathrm{kg}", "\\boxed{5\\text{ cm}^2}", "6 \\text{ cm}", "\\boxed{5 \\text{ hours}}"])
    add("units", "$90^\\circ$", ["90", "90^\\circ", "$90^{\\circ}$", "\\boxed{90^\\circ}", "\\frac{\\pi}{2}", "89^\\circ", "90 degrees"])
    add("units", "$\\$18.50$", ["18.50", "\\$18.50", "$18.5", "\\boxed{\\$18.50}", "18.05", "18.5 dollars"])
    add("units", "$72$", ["\\boxed{72 \\text{ square units}}", "72 \\text{ units}^2", "72 sq units", "\\boxed{72\\,\\text{cm}^2}", "\\boxed{73}"])

    # Text answers and multiple choice.
    add("text", "$\\text{(C)}$", ["\\text{(C)}", "(C)", "\\boxed{C}", "\\boxed{\\text{C}}", "\\textbf{(C)}", "\\boxed{(B)}", "C"])
    add("text", "$\\text{Tuesday}$", ["\\text{Tuesday}", "\\boxed{\\text{Tuesday}}", "\\boxed{Tuesday}", "Tuesday", "\\text{tuesday}", "\\text{Monday}", "\\boxed{\\textbf{Tuesday}}"])
    add("text", "$\\text{even}$", ["\\text{even}", "\\boxed{\\text{even}}", "\\boxed{\\text{odd}}", "even", "\\boxed{\\text{neither}}"])
    add("text", "$\\text{yes}$", ["\\boxed{\\text{Yes}}", "\\boxed{\\text{yes}}", "\\boxed{\\text{no}}", "\\boxed{Yes}"])
    add("text", "$B$", ["\\boxed{B}", "\\boxed{b}", "B", "\\boxed{\\text{B}}", "\\boxed{A}", "\\boxed{\\mathrm{B}}"])

    # Symbolic expressions.
    add("symbolic", "$x^2+2x+1$", ["(x+1)^2", "x^2+2x+1", "1+2x+x^2", "$(1+x)^2$", "x^2+1", "(x-1)^2", "x(x+2)+1", "x^{2} + 2 x + 1"])
    add("symbolic", "$\\frac{x+1}{x-1}$", ["\\frac{x+1}{x-1}", "\\frac{1+x}{x-1}", "\\frac{-x-1}{1-x}", "(x+1)/(x-1)", "\\frac{x-1}{x+1}", "1+\\frac{2}{x-1}"])
    add("symbolic", "$2-2p$", ["2-2p", "2(1-p)", "-2p+2", "2p-2", "2-p", "\\boxed{2 - 2 p}"])
    add("symbolic", "$a^2-b^2$", ["(a-b)(a+b)", "(a+b)(a-b)", "a^2-b^2", "-b^2+a^2", "(a-b)^2", "b^2-a^2"])
    add("symbolic", "$\\frac{n(n+1)}{2}$", ["\\frac{n^2+n}{2}", "\\frac{n(n+1)}{2}", "\\binom{n+1}{2}", "\\frac{n(n-1)}{2}", "n(n+1)/2", "0.5n^2+0.5n"])
    add("symbolic", "$\\sqrt{x^2+1}$", ["\\sqrt{1+x^2}", "(x^2+1)^{1/2}", "\\sqrt{x^2}+1", "x+1", "\\sqrt{x^{2}+1}"])
    add("symbolic", "$3x-7$", ["3x-7", "-7+3x", "3 x - 7", "7-3x", "3(x-2)-1", "3x+7"])
    add("symbolic", "$\\sin^2 x$", ["1-\\cos^2 x", "\\sin^2 x", "(\\sin x)^2", "\\frac{1-\\cos 2x}{2}", "\\cos^2 x", "2\\sin x"])
    add("symbolic", "$e^{x}$", ["e^x", "\\exp(x)", "e^{x}", "x e", "e^{-x}"])
    add("symbolic", "$\\frac{1}{2}x^2$", ["\\frac{x^2}{2}", "0.5x^2", "x^2/2", "\\frac{x^2}{4}", "2x^2"])

    # Equations and relations.
    add("equation", "$x=3$", ["3", "x=3", "$x = 3$", "\\boxed{x=3}", "y=3", "x=4", "\\boxed{3}", "2x=6", "x-3=0"])
    add("equation", "$3$", ["x=3", "\\boxed{x = 3}", "k=3", "x=-3", "a = 3"])
    add("equation", "$y=2x+1$", ["y=2x+1", "y=1+2x", "2x+1", "y = 2x + 1", "y=2x-1", "y - 2x = 1", "2x-y+1=0", "y=x+1"])
    add("equation", "$x^2+y^2=25$", ["x^2+y^2=25", "y^2+x^2=25", "x^2+y^2-25=0", "x^2+y^2=5", "25=x^2+y^2"])
    add("equation", "$k=\\frac{1}{3}$", ["\\frac{1}{3}", "k=\\frac13", "k = 0.333333", "k=\\frac{1}{4}", "\\boxed{k=1/3}"])
    add("equation", "$a=2, b=5$", ["a=2, b=5", "b=5, a=2", "2, 5", "a=5, b=2", "(2, 5)"])
    add("inequality", "$x>3$", ["x>3", "3<x", "x > 3", "x\\ge 3", "x<3", "(3, \\infty)", "x>4", "-x<-3"])
    add("inequality", "$x \\le -1$", ["x\\le -1", "x \\leq -1", "-1 \\ge x", "x<-1", "(-\\infty, -1]", "x\\ge -1"])
    add("inequality", "$-2 < x < 5$", ["-2<x<5", "(-2, 5)", "-2 < x \\le 5", "x>-2", "-2<x<4"])

    # Sets, intervals, tuples, several answers.
    add("set", "$\\{1, 2, 3\\}$", ["\\{1,2,3\\}", "\\{3, 2, 1\\}", "\\{1,3,2\\}", "1, 2, 3", "\\{1,2\\}", "\\{1,2,3,4\\}", "\\{1,2,4\\}", "\\boxed{\\{2,1,3\\}}"])
    add("set", "$\\{-2, 2\\}$", ["\\pm 2", "-2, 2", "2, -2", "\\{2,-2\\}", "2", "-2", "\\{-2,2,0\\}", "x=\\pm 2"])
    add("set", "$1, 4$", ["1, 4", "4, 1", "\\boxed{1}, \\boxed{4}", "\\boxed{1} and \\boxed{4}", "1 and 4", "\\{1, 4\\}", "1", "1, 5"])
    add("set", "$\\frac{1}{2}, -3$", ["-3, \\frac{1}{2}", "0.5, -3", "x=\\frac12, x=-3", "\\frac{1}{2}", "-3, 2"])
    add("set", "$\\emptyset$", ["\\emptyset", "\\varnothing", "\\{\\}", "\\{0\\}", "0"])
    add("set", "$3, 5, 7$", ["\\boxed{3, 5, 7}", "\\boxed{7, 5, 3}", "\\boxed{3,5}", "$3$, $5$, and $7$", "3, 5 and 7"])
    add("interval", "$[0, 1)$", ["[0,1)", "[0, 1)", "\\left[0, 1\\right)", "(0, 1)", "[0,1]", "(0,1]", "[0, 2)", "0 \\le x < 1"])
    add("interval", "$(-\\infty, 2]$", ["(-\\infty, 2]", "(-\\infty,2]", "x\\le 2", "(-\\infty, 2)", "[2, \\infty)", "(-\\infty, 3]"])
    add("interval", "$(1, 4)$", ["(1,4)", "(1, 4)", "1, 4", "\\{1, 4\\}", "[1, 4]", "(4, 1)", "(1, 5)", "1 < x < 4"])
    add("interval", "$(-\\infty, -1) \\cup (1, \\infty)$", ["(-\\infty,-1)\\cup(1,\\infty)", "(1, \\infty) \\cup (-\\infty, -1)", "(-\\infty, -1] \\cup [1, \\infty)", "(-\\infty, -1)", "(-\\infty,-1)\\cup(2,\\infty)"])
    add("interval", "$[2, 5]$", ["[2,5]", "[2, 5]", "2 \\le x \\le 5", "[5, 2]", "(2,5)", "[2, 6]", "\\left[ 2,5 \\right]"])
    add("tuple", "$(2, 3)$", ["(2,3)", "(2, 3)", "(3, 2)", "\\left(2, 3\\right)", "(2, 4)", "2, 3", "\\boxed{(2,3)}"])
    add("tuple", "$(3, \\frac{\\pi}{2})$", ["\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", "(3, 1.570796)", "(3, \\frac{\\pi}{4})", "(\\frac{\\pi}{2}, 3)"])
    add("tuple", "$(1, -2, 3)$", ["(1,-2,3)", "(1, -2, 3)", "(3, -2, 1)", "(1, 2, 3)", "\\left(1,-2,3\\right)", "(1,-2)", "\\langle 1, -2, 3 \\rangle"])
    add("tuple", "$(5, 2)$", ["(5,2)", "(2, 5)", "(5, 2)", "\\boxed{(5,2)}", "5, 2"])
    add("tuple", "$(-1, 0)$", ["(-1,0)", "(0, -1)", "(-1, 0)", "(-1.0, 0.0)", "(1, 0)"])

    # Matrices and vectors.
    mat = "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"
    add("matrix", "$" + mat + "$", [mat, "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", "\\begin{pmatrix} 1.0 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\boxed{" + mat + "}"])
    vec = "\\begin{pmatrix} 3 \\\\ -1 \\\\ 2 \\end{pmatrix}"
    add("matrix", "$" + vec + "$", [vec, "\\begin{pmatrix} 3 \\\\ -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} -1 \\\\ 3 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 6/2 \\\\ -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 3 \\\\ 1 \\\\ 2 \\end{pmatrix}", "(3, -1, 2)"])
    add("matrix", "$\\begin{pmatrix} \\frac{1}{2} & 0 \\\\ 0 & \\frac{1}{2} \\end{pmatrix}$", ["\\begin{pmatrix} 0.5 & 0 \\\\ 0 & 0.5 \\end{pmatrix}", "\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 1/2 \\end{pmatrix}", "\\begin{pmatrix} 2 & 0 \\\\ 0 & 2 \\end{pmatrix}", "\\frac{1}{2}"])

    # Completions: reasoning then an answer, boxed or not.
    add("completion", "$\\frac{14}{3}$", [
        "We add: $2+\\frac{5}{3}+1=\\boxed{\\frac{14}{3}}$",
        "First $f(1)=2$, then the sum is $\\frac{14}{3}$.",
        "So the answer is $\\frac{14}{3}$ and we are done.",
        "Thus $x = \\boxed{\\frac{13}{3}}$.",
        "Adding gives 14/3",
        "The sum is \\boxed{4.666667}.",
        "The sum is \\boxed{4.67}.",
        "I get $\\boxed{\\frac{14}{3}}$ but the last line says \\boxed{5}.",
        "<think>2 + 5/3 + 1</think><answer>$\\frac{14}{3}$</answer>",
        "Final Answer: The final answer is $\\frac{14}{3}$. I hope it is correct.",
    ])
    add("completion", "$10$", [
        "Counting, there are 3 red and 7 blue, so $3 + 7 = \\boxed{10}$ marbles.",
        "There are 3 red and 7 blue, 10 in all.",
        "3 red, 7 blue. Answer: 10",
        "3 + 7 = 11",
        "$3+7=10$",
        "The answer is \\boxed{ten}.",
        "We find \\(10\\).",
        "We find \\[10\\]",
        "$$10$$",
        "Therefore, the number of marbles is $\\boxed{10}$. Wait, we double counted: $\\boxed{9}$.",
    ])
    add("completion", "$(2, -1)$", [
        "Solving the system gives $x=2$ and $y=-1$, so the point is $\\boxed{(2,-1)}$.",
        "The intersection point is $(2, -1)$.",
        "The point is \\boxed{(-1, 2)}.",
        "So $x=2, y=-1$.",
    ])
    add("completion", "$\\{1, 2\\}$", [
        "The roots are $x = 1$ and $x = 2$.",
        "The solutions are $\\boxed{1}$ and $\\boxed{2}$.",
        "So $x \\in \\{1, 2\\}$.",
        "The solutions are \\boxed{1, 2}.",
        "Only $\\boxed{1}$ works.",
    ])
    add("completion", "$2-2p$", [
        "Since $x<2$, $|x-2|=2-x$. If $2-x=p$, then $x=2-p$, so $x-p=\\boxed{2-2p}$.",
        "Thus $x - p = 2 - 2p$.",
        "Thus $x - p = \\boxed{2+2p}$.",
    ])
    add("completion", "$5$", [
        "The remainder is \\boxed{5}.",
        "The remainder is $5$. (Checking: $17 = 3\\cdot 4 + 5$.)",
        "Hence the remainder equals five.",
        "the remainder is 5 when divided",
        "so \\boxed{5}\\boxed{5}",
    ])

    # Gold answers written as full solutions.
    add("gold_solution", "Multiply: $6 \\cdot 7 = \\boxed{42}$.", ["42", "\\boxed{42}", "The product is $42$.", "41", "6 \\cdot 7"])
    add("gold_solution", "The area is $\\boxed{\\frac{25\\pi}{4}}$ square units.", ["\\frac{25\\pi}{4}", "6.25\\pi", "19.634954", "\\frac{25}{4}\\pi", "25\\pi", "\\boxed{\\frac{25 \\pi}{4}}"])

    # Numbers with more rounding edge cases.
    for gold, preds in [
        ("$\\frac{1}{7}$", ["0.142857", "0.1428571", "0.142858", "0.14", "0.143"]),
        ("$0.1$", ["\\frac{1}{10}", "0.10", "0.1000001", "0.1000005", "0.10001", "10\\%"]),
        ("$1000.5$", ["1000,5", "1,000.5", "1 000.5", "1000.50", "1000.4", "\\frac{2001}{2}"]),
        ("$-0.5$", ["-\\frac{1}{2}", "-1/2", "-.5", "0.5", "\\frac{-1}{2}"]),
        ("$100$", ["1e2", "10^2", "100.0", "99.9999999", "99.99"]),
        ("$\\pi$", ["3.141593", "3.14159265", "3.14", "\\frac{22}{7}", "\\pi", "180^\\circ"]),
        ("$\\sqrt{5}$", ["2.236068", "2.2360679", "2.24", "5^{0.5}", "\\sqrt{5}"]),
    ]:
        add("rounding", gold, preds)

    # Mixed: expressions against numbers, big and odd inputs.
    add("misc", "$6$", ["3!", "\\binom{4}{2}", "\\frac{12}{2}", "2 \\times 3", "2 \\cdot 3", "|{-6}|", "\\lfloor 6.5 \\rfloor", "\\lceil 5.2 \\rceil", "7"])
    add("misc", "$123456789$", ["123456789", "123,456,789", "123456788", "1.23456789 \\times 10^8"])
    add("misc", "$\\infty$", ["\\infty", "infinity", "+\\infty", "-\\infty", "\\text{infinite}"])
    add("misc", "$\\text{no solution}$", ["\\text{no solution}", "\\boxed{\\text{no solution}}", "\\boxed{\\text{none}}", "\\emptyset"])
    add("misc", "$\\frac{3}{4}$", ["\\frac34", "\\frac{3}{4}", "\\frac 34", "3/4", "\\frac{3}{5}", "0.75"])
    add("misc", "$x$", ["x", "X", "\\boxed{x}", "y", "\\boxed{X}"])
    P.extend(hard_pairs())
    P.extend(("misc2", g, p) for g, p in misc_pairs())
    P.extend(("misc3", g, p) for g, p in more_pairs())
    return P


def more_pairs():
    """A fourth batch, also written after the checker passed the others: ratios, repeating
    decimals, approximations, letter choices, sequences, inverse functions."""
    pairs = [
     ("$\\frac{5}{2}$", "So the ratio is $5:2$."), ("$2:3$", "$\\boxed{\\frac{2}{3}}$"),
     ("$\\text{A, C}$", "$\\boxed{A, C}$"), ("$\\text{B, D}$", "$\\boxed{\\text{D, B}}$"),
     ("$\\sqrt{3}/2$", "$\\boxed{\\frac{\\sqrt3}2}$"), ("$0.\\overline{3}$", "$\\boxed{\\frac13}$"),
     ("$3 \\sqrt{3}$", "The area is $3\\sqrt3 \\approx 5.196$."), ("$5.196$", "The area is $3\\sqrt3 \\approx 5.196$."),
     ("$x = -\\frac{b}{2a}$", "$\\boxed{-\\frac{b}{2a}}$"), ("$\\frac{-b \\pm \\sqrt{b^2-4ac}}{2a}$", "$\\boxed{\\frac{-b+\\sqrt{b^2-4ac}}{2a}, \\frac{-b-\\sqrt{b^2-4ac}}{2a}}$"),
     ("$y = 3$", "The horizontal asymptote is $y=3$."), ("$(4, -3)$", "The center is at $(4,-3)$, radius $5$."),
     ("$5$", "The center is at $(4,-3)$, radius $5$."), ("$72^\\circ$", "Each angle is $\\boxed{72}$ degrees."),
     ("$\\frac{1}{64}$", "$\\left(\\frac{1}{4}\\right)^3 = \\boxed{\\frac{1}{64}}$"), ("$2^{12}$", "$\\boxed{4096}$"),
     ("$-2 \\le x \\le 2$", "$\\boxed{[-2, 2]}$"), ("$[-2,2]$", "$\\boxed{-2 \\le x \\le 2}$"),
     ("$\\{(1,2), (2,1)\\}$", "$\\boxed{(2,1), (1,2)}$"), ("$11\\sqrt{2}$", "$\\boxed{\\sqrt{242}}$"),
     ("$\\frac{7}{9}$", "$\\boxed{0.\\overline{7}}$"), ("$0.777778$", "$\\boxed{\\frac{7}{9}}$"),
     ("$\\$ 32$", "The cost is $32$ dollars."), ("$32$", "The total cost is $\\$32$."),
     ("$1 + \\sqrt{2}$", "$\\boxed{\\sqrt2+1}$"), ("$\\frac{1+\\sqrt{5}}{2}$", "$\\boxed{1.618034}$"),
     ("$\\text{No}$", "$\\boxed{\\text{no}}$"), ("$\\infty$", "$\\boxed{\\infty}$"),
     ("$n^2$", "The sum of the first $n$ odd numbers is $\\boxed{n^2}$."), ("$2n-1$", "$a_n = \\boxed{2n - 1}$"),
     ("$a_n = 2n-1$", "$\\boxed{2n-1}$"), ("$f^{-1}(x) = \\frac{x-3}{2}$", "$\\boxed{\\frac{x-3}{2}}$"),
     ("$\\frac{x-3}{2}$", "$f^{-1}(x)=\\frac{x}{2}-\\frac{3}{2}$"), ("$8\\pi$", "$\\boxed{8\\pi\\text{ square units}}$"),
     ("$3$", "\\boxed{\\textbf{(C) } 3}"), ("$\\textbf{(C) }3$", "\\boxed{C}"),
     ("$4$", "The answer is $\\boxed{4}$.\n\nVerification: $2^2 = 4$ \\checkmark"), ("$100\\pi$", "$\\boxed{314.159265}$"),
     ("$\\frac{\\pi}{6}$", "$\\boxed{30^\\circ}$"), ("$-\\sqrt{3}$", "$\\boxed{-1.732051}$"),
    ]
    return pairs


def misc_pairs():
    """A third batch, written after the checker passed the first two: complex numbers, degrees,
    congruences, named sets, unknowns as tuples, units after boxes, answer words."""
    pairs = [
     ("$1+2i$", "$\\boxed{2i+1}$"), ("$1+2i$", "$\\boxed{1-2i}$"), ("$i$", "$\\boxed{i}$"), ("$-1$", "$i^2$"),
     ("$30^\\circ$", "$\\boxed{30}$"), ("$30^\\circ$", "$\\boxed{30^{\\circ}}$"), ("$30$", "$\\boxed{\\frac{\\pi}{6}}$"),
     ("$\\$5.00$", "$\\boxed{5}$"), ("$5,\\!000$", "$\\boxed{5000}$"), ("$5000$", "$\\boxed{5,\\!000}$"),
     ("$x \\in [1,2]$", "$\\boxed{[1,2]}$"), ("$[1,2]$", "$x \\in [1, 2]$"), ("$\\left\\{ 1,2 \\right\\}$", "$\\boxed{\\{2,1\\}}$"),
     ("$-\\infty$", "$\\boxed{-\\infty}$"), ("$\\{1\\}$", "$\\boxed{1}$"), ("$(1,2] \\cup [3,4)$", "$\\boxed{(1,2]\\cup[3,4)}$"),
     ("$y^2 = 4x$", "$\\boxed{y^2=4x}$"), ("$y^2 = 4x$", "$\\boxed{4x = y^2}$"), ("$f(x)=2x$", "$\\boxed{2x}$"), ("$f(x) = 2x$", "$\\boxed{f(x)=2x}$"),
     ("$\\frac{\\pi}{2}$", "$\\boxed{\\dfrac{1}{2}\\pi}$"), ("$\\frac{\\sqrt{3}}{3}$", "$\\boxed{\\frac{1}{\\sqrt{3}}}$"),
     ("$3$ and $5$", "$\\boxed{3 \\text{ and } 5}$"), ("$3, 5$", "$\\boxed{3}, \\boxed{5}$"),
     ("$\\frac{9}{4}$", "Final Answer: The final answer is $\\frac94$. I hope it is correct."),
     ("$\\frac{9}{4}$", "The final answer is $\\boxed{2.25}$"), ("$2.25$", "The final answer is $\\boxed{\\frac{9}{4}}$"),
     ("$10\\%$", "$\\boxed{10}$\\%"), ("$10\\%$", "$\\boxed{0.1}$"), ("$0.1$", "$\\boxed{10\\%}$"),
     ("$\\text{Monday}$", "\\boxed{\\text{Monday}}"), ("Monday", "\\boxed{Monday}"),
     ("$17$", "so $n=17$"), ("$17$", "so $n \\equiv 17 \\pmod{20}$"), ("$17$", "$\\boxed{17}$ is the answer, not 18."),
     ("$\\sqrt{2}+\\sqrt{3}$", "$\\boxed{\\sqrt{3}+\\sqrt{2}}$"), ("$\\sqrt{5+2\\sqrt{6}}$", "$\\boxed{\\sqrt{2}+\\sqrt{3}}$"),
     ("$2^{2/3}$", "$\\boxed{\\sqrt[3]{4}}$"), ("$\\log_2 3$", "$\\boxed{\\frac{\\log 3}{\\log 2}}$"),
     ("$\\binom{5}{2}$", "$\\boxed{10}$"), ("$\\dbinom{6}{3}$", "$\\boxed{20}$"), ("$4!$", "$\\boxed{24}$"),
     ("$\\frac{1}{4}$", "$\\boxed{25\\%}$"), ("$(1, 2, 3)$", "$\\boxed{\\langle 1,2,3\\rangle}$"),
     ("$\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}$", "$\\boxed{(1,2)}$"),
     ("$a=1,b=2,c=3$", "$\\boxed{a=1, b=2, c=3}$"), ("$(a,b)=(1,2)$", "$\\boxed{(1,2)}$"),
     ("$-\\frac{3}{2}$", "$\\boxed{-1.5}$"), ("$\\frac{-3}{2}$", "$\\boxed{-\\frac32}$"),
     ("$6\\sqrt{6}$", "$\\boxed{\\sqrt{216}}$"), ("$\\frac{3\\sqrt{3}}{2}$", "$\\boxed{\\frac{3}{2}\\sqrt{3}}$"),
     ("$1.5$", "$\\boxed{\\frac{3}{2}}$ hours"), ("$90$", "$\\boxed{90\\text{ degrees}}$"), ("$12$", "\\boxed{12\\text{ inches}^2}"),
     ("$2$", "There are \\boxed{\\text{two}} solutions"), ("$0$", "$\\boxed{\\text{none}}$"),
     ("$\\frac{1}{2}$", "\\[\\boxed{\\frac{1}{2}}\\]"), ("$8$", "**Answer: 8**"), ("$8$", "Answer: $8$."), ("$8$", "ANSWER: 8"),
     ("$x^3 + 3x^2 + 3x + 1$", "$\\boxed{(x+1)^3}$"), ("$\\frac{x}{x+1}$", "$\\boxed{1 - \\frac{1}{x+1}}$"),
     ("$e^{i\\pi}$", "$\\boxed{-1}$"), ("$\\cos 60^\\circ$", "$\\boxed{\\frac{1}{2}}$"), ("$\\tan \\frac{\\pi}{3}$", "$\\boxed{\\sqrt{3}}$"),
     ("$k \\ne 2$", "$\\boxed{k \\neq 2}$"), ("$(-\\infty, 2) \\cup (2, \\infty)$", "$\\boxed{x \\neq 2}$"),
     ("$\\mathbb{R}$", "$\\boxed{(-\\infty,\\infty)}$"), ("$\\mathbb{R}$", "$\\boxed{\\mathbb{R}}$"),
     ("$3\\pi$", "$\\boxed{3 \\pi \\text{ cm}^2}$"), ("$\\frac{4}{3}\\pi r^3$", "$\\boxed{\\frac{4\\pi r^3}{3}}$"),
     ("$\\$1.50$", "It costs \\$1.50."), ("$150$", "It costs 150 cents"), ("$0.75$", "$\\boxed{\\frac{3}{4}}$ of the pie"),
     ("$2$", "$\\boxed{2}$. \\boxed{3} is wrong"), ("$1$", "1. First step 2. Second step. The answer is $1$"),
     ("$\\pm 1$", "$\\boxed{1, -1}$"), ("$\\pm\\sqrt{2}$", "$\\boxed{\\sqrt{2}, -\\sqrt{2}}$"),
     ("$x=1$ or $x=2$", "$\\boxed{1,2}$"), ("$\\{x | x > 0\\}$", "$\\boxed{(0,\\infty)}$"),
     ("$5\\sqrt{2}$", "$\\boxed{5 \\sqrt{2}}$ units"), ("$3.5\\times10^{-2}$", "$\\boxed{0.035}$"),
     ("$1{,}000$", "$\\boxed{1000}$"), ("$1,000$", "$\\boxed{1000}$"), ("$1000$", "$\\boxed{1\\,000}$"),
    ]
    return pairs


def hard_pairs():
    """Longer completions and less regular notation."""
    P = []

    def add(cat, gold, preds):
        for p in preds:
            P.append((cat, gold, p))

    add("long", "$\\frac{3}{8}$", [
        "There are $\\binom{4}{2} = 6$ ways out of $16$, so the probability is $\\frac{6}{16} = \\frac{3}{8}$.",
        "The probability is $\\frac{6}{16}$, which simplifies to $\\boxed{\\dfrac{3}{8}}$.",
        "We get $6/16 = 0.375$.",
        "So $P = \\frac{6}{16} = \\frac{3}{8}$, i.e. $37.5\\%$.",
        "Final Answer: The final answer is $\\frac{3}{8}$. I hope it is correct.",
        "Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.",
        "**Answer:** $\\tfrac{3}{8}$",
        "Answer: 0.375",
        "The answer: $\\frac38$ (three eighths).",
        "$\\frac{3}{8}$ is not right; the answer is $\\frac{1}{4}$.",
    ])
    add("long", "$12$", [
        "Let $n$ be the number. Then $3n + 4 = 40$, so $3n = 36$ and $n = 12$.",
        "From $3n+4=40$ we get $n=\\boxed{12}$.",
        "$3n + 4 = 40 \\Rightarrow n = 12$",
        "Solving, $n = 36/3 = 12$.",
        "We have $3n=36$, hence the number is 12.",
        "So $n = 13$.",
        "The number is **12**.",
        "The number is \\( 12 \\).",
        "Thus the answer is \\[n = 12.\\]",
        "The answer is $12$ cookies.",
    ])
    add("long", "$(-\\infty, -3) \\cup (3, \\infty)$", [
        "We need $|x| > 3$, so $x \\in \\boxed{(-\\infty,-3)\\cup(3,\\infty)}$.",
        "The solution set is $(-\\infty, -3) \\cup (3, \\infty)$.",
        "The solution is $x < -3$ or $x > 3$.",
        "$\\boxed{(3, \\infty)}$",
        "$\\boxed{(-\\infty,-3]\\cup[3,\\infty)}$",
    ])
    add("long", "$\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}$", [
        "The projection is $\\boxed{\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}}$.",
        "Hence $\\mathbf{v} = \\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}.$",
        "$\\boxed{\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}}$",
        "$\\boxed{\\left(\\begin{matrix} 2 \\\\ -1 \\end{matrix}\\right)}$",
        "$\\boxed{\\begin{pmatrix} 4/2 \\\\ -1 \\end{pmatrix}}$",
    ])
    add("long", "$\\text{(D)}$", [
        "Comparing the options, only (D) works, so the answer is $\\boxed{\\text{(D)}}$.",
        "The answer is $\\boxed{D}$.",
        "The answer is $\\boxed{\\textbf{(D)}}$.",
        "The answer is $\\boxed{\\text{(A)}}$.",
        "The answer is (D).",
        "\\boxed{\\mathrm{(D)}}",
    ])
    add("long", "$4\\sqrt{2}$", [
        "The diagonal is $\\sqrt{4^2+4^2} = \\sqrt{32} = \\boxed{4\\sqrt{2}}$.",
        "The diagonal is $\\sqrt{32}$.",
        "The diagonal is $\\boxed{4\\sqrt2}$ units.",
        "The diagonal is about $5.656854$.",
        "The diagonal is about $5.66$.",
        "The diagonal is $\\boxed{2\\sqrt{8}}$.",
        "The diagonal is $\\boxed{8\\sqrt{2}}$.",
        "The diagonal is $\\boxed{\\sqrt{2}\\cdot4}$.",
    ])
    add("long", "$20\\%$", [
        "The price fell from $\\$50$ to $\\$40$, a decrease of $\\frac{10}{50} = 20\\%$.",
        "The decrease is $\\boxed{20\\%}$.",
        "The decrease is $\\boxed{20}$ percent.",
        "It decreased by 20%.",
        "It decreased by 0.2.",
        "It decreased by $\\boxed{25\\%}$.",
        "It decreased by $\\boxed{\\frac{1}{5}}$.",
    ])
    add("long", "$-\\frac{1}{2}$", [
        "Then $\\cos\\theta = \\frac{\\mathbf{u}\\cdot\\mathbf{v}}{|\\mathbf{u}||\\mathbf{v}|} = -\\frac{1}{2}$.",
        "So $\\cos \\theta = \\boxed{-\\tfrac12}$.",
        "So $\\cos\\theta = -0.5$.",
        "So $\\cos\\theta = \\boxed{\\frac{1}{2}}$.",
        "So $\\cos\\theta = \\boxed{-1/2}$.",
    ])
    add("long", "$x^2 - 5x + 6$", [
        "Expanding, $(x-2)(x-3) = \\boxed{x^2-5x+6}$.",
        "The polynomial is $\\boxed{(x-2)(x-3)}$.",
        "The polynomial is $\\boxed{x^2+5x+6}$.",
        "The polynomial is $\\boxed{6 - 5x + x^2}$.",
        "$p(x) = x^2 - 5x + 6$",
    ])
    add("long", "$\\{2, 3\\}$", [
        "Factoring, $(x-2)(x-3)=0$, so $x = 2$ or $x = 3$.",
        "The roots are $\\boxed{2, 3}$.",
        "The roots are $\\boxed{3,2}$.",
        "The roots are $\\boxed{2}$ and $\\boxed{3}$.",
        "The roots are $x=2$ and $x=3$.",
        "The roots are $\\boxed{x=2 \\text{ or } x=3}$.",
        "The roots are $\\boxed{-2, -3}$.",
        "The roots are $\\boxed{2}$.",
    ])
    add("long", "$\\$1,\\!250$", [
        "She earns $\\$1{,}250$.",
        "She earns $\\boxed{\\$1250}$.",
        "She earns $\\boxed{1,250}$ dollars.",
        "She earns 1250 dollars.",
        "She earns $\\boxed{\\$1,\\!205}$.",
    ])
    add("long", "$\\frac{\\pi}{4}$", [
        "Since $\\tan\\theta = 1$, $\\theta = \\boxed{\\frac{\\pi}{4}}$.",
        "$\\theta = 45^\\circ$",
        "$\\theta = \\boxed{\\pi/4}$",
        "$\\theta = \\boxed{0.785398}$",
        "$\\theta = \\boxed{\\frac{\\pi}{2}}$",
        "$\\theta = \\boxed{\\arctan 1}$",
    ])
    add("long", "$y = -2x + 7$", [
        "The line through $(1,5)$ with slope $-2$ is $y - 5 = -2(x - 1)$, i.e. $\\boxed{y = -2x + 7}$.",
        "The line is $\\boxed{y=7-2x}$.",
        "The line is $\\boxed{2x + y = 7}$.",
        "The line is $\\boxed{y = -2x + 5}$.",
        "The line is $\\boxed{-2x+7}$.",
    ])
    add("long", "$5040$", [
        "There are $7! = \\boxed{5040}$ orders.",
        "There are $7!$ orders.",
        "There are $\\boxed{7!}$ orders.",
        "There are 5,040 orders.",
        "There are $\\boxed{5\\,040}$ orders.",
        "There are $\\boxed{720}$ orders.",
    ])
    add("long", "$\\sqrt{10}$", [
        "The distance is $\\sqrt{(4-1)^2 + (3-2)^2} = \\sqrt{10}$.",
        "The distance is $\\boxed{\\sqrt{10}}$.",
        "The distance is $\\boxed{10^{1/2}}$.",
        "The distance is $\\boxed{3.162278}$.",
        "The distance is $\\boxed{\\sqrt{11}}$.",
    ])
    add("long", "$3$ and $-3$", [
        "$x^2 = 9$ gives $\\boxed{\\pm 3}$.",
        "$x = 3$ or $x = -3$.",
        "$\\boxed{-3, 3}$",
        "$\\boxed{3}$",
    ])
    add("long", "$[-2, 4]$", [
        "The range of $f$ is $\\boxed{[-2, 4]}$.",
        "The range is $-2 \\le y \\le 4$.",
        "The range is $\\boxed{[-2,4)}$.",
        "The range is $\\boxed{\\left[-2,4\\right]}$.",
    ])
    add("long", "$\\text{odd}$", [
        "Since $f(-x) = -f(x)$, $f$ is $\\boxed{\\text{odd}}$.",
        "$f$ is $\\boxed{odd}$.",
        "$f$ is $\\boxed{\\text{even}}$.",
        "The function is odd.",
    ])
    add("long", "$\\dfrac{7}{2}$", [
        "$\\frac{7}{2}$",
        "$3\\tfrac{1}{2}$",
        "$3.5$",
        "$\\boxed{3 \\frac{1}{2}}$",
        "$\\boxed{\\frac{14}{4}}$",
        "$\\boxed{3.4}$",
    ])
    add("long", "$a = 3, b = -1$", [
        "Solving gives $a = 3$ and $b = -1$, so $\\boxed{a=3, b=-1}$.",
        "$\\boxed{(3, -1)}$",
        "$\\boxed{b=-1, a=3}$",
        "$\\boxed{a=-1, b=3}$",
    ])
    add("long", "$\\ln 3$", [
        "$\\boxed{\\ln 3}$",
        "$\\boxed{\\log_e 3}$",
        "$\\boxed{1.098612}$",
        "$\\boxed{\\ln 9 - \\ln 3}$",
        "$\\boxed{\\log 3}$",
    ])
    add("long", "$2^{-3}$", ["$\\boxed{\\frac{1}{8}}$", "$\\boxed{0.125}$", "$\\boxed{\\frac{1}{2^3}}$", "$\\boxed{-8}$", "$\\boxed{2^{-3}}$"])
    add("long", "$e$", ["$\\boxed{e}$", "$\\boxed{2.718282}$", "$\\boxed{\\exp(1)}$", "$\\boxed{E}$", "$\\boxed{2.72}$"])
    add("long", "$1.2 \\times 10^{5}$", ["$\\boxed{120000}$", "$\\boxed{120{,}000}$", "$\\boxed{1.2 \\cdot 10^5}$", "$\\boxed{12 \\times 10^4}$", "$\\boxed{1.2\\times10^{6}}$"])
    add("long", "$\\frac{a+b}{2}$", ["$\\boxed{\\frac{b+a}{2}}$", "$\\boxed{\\frac{a}{2}+\\frac{b}{2}}$", "$\\boxed{(a+b)/2}$", "$\\boxed{\\frac{a-b}{2}}$", "$\\boxed{a+b}$"])
    add("long", "$\\frac{1}{x}$", ["$\\boxed{x^{-1}}$", "$\\boxed{\\frac{1}{x}}$", "$\\boxed{\\frac{x}{x^2}}$", "$\\boxed{-x}$"])
    add("long", "$x \\ge 2$", ["$\\boxed{x \\geq 2}$", "$\\boxed{[2, \\infty)}$", "$\\boxed{2 \\le x}$", "$\\boxed{x > 2}$", "$\\boxed{x\\ge 3}$"])
    add("long", "$(0, 0), (1, 1)$", ["$\\boxed{(0,0), (1,1)}$", "$\\boxed{(1,1),(0,0)}$", "$\\boxed{(0,0)}$", "$\\boxed{(0,1),(1,0)}$"])
    add("long", "$9$", ["$\\boxed{9}$ hours", "$\\boxed{9\\text{ hours}}$", "$\\boxed{9 \\mathrm{~h}}$", "$\\boxed{09}$", "$\\boxed{3^2}$", "$\\boxed{\\sqrt{81}}$", "$\\boxed{-9}$"])
    add("long", "$\\frac{1}{6}$", ["$\\boxed{\\frac{1}{6}}$", "$\\boxed{0.166667}$", "$\\boxed{0.1\\overline{6}}$", "$\\boxed{0.17}$", "$\\boxed{16.67\\%}$", "$\\boxed{\\frac{2}{12}}$"])
    return P


def main():
    rows = []
    for cat, gold, pred in pairs():
        g = parse(gold, CONFIG)
        p = parse(pred, CONFIG)
        rows.append({"category": cat, "gold": gold, "pred": pred, "math_verify": bool(verify(g, p, float_rounding=6))})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    n_true = sum(r["math_verify"] for r in rows)
    print(f"{len(rows)} pairs, {n_true} equivalent per math-verify -> {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
