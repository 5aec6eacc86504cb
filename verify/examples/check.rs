//! Prints what the checker extracts from each argument, and, for pairs, the verdict:
//! `cargo run -p verify --example check -- GOLD PRED [GOLD PRED ...]`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let gold = verify::parse(&pair[0]);
        println!("gold {:?}\n  -> {:?}", pair[0], gold);
        if let Some(pred_text) = pair.get(1) {
            let pred = verify::parse(pred_text);
            println!(
                "pred {:?}\n  -> {:?}\n  equivalent: {}",
                pred_text,
                pred,
                verify::verify(&gold, &pred)
            );
        }
    }
}
