//! `cargo run --release -p thumbnail --example thumb -- FILE WIDTH HEIGHT [crop] [animated] [RUNS]`:
//! renders FILE's thumbnail RUNS times (default 1) and prints the time of each and the output's
//! size; writes the last one to FILE.thumb. For profiling the thumbnailer alone.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data = std::fs::read(&args[0]).unwrap();
    let (width, height) = (args[1].parse().unwrap(), args[2].parse().unwrap());
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let runs = args
        .last()
        .and_then(|a| a.parse().ok())
        .filter(|_| args.len() > 3)
        .unwrap_or(1);
    let request = thumbnail::Request {
        width,
        height,
        method: if has("crop") {
            thumbnail::Method::Crop
        } else {
            thumbnail::Method::Scale
        },
        animated: has("animated"),
    };
    let mut last = None;
    for _ in 0..runs {
        let started = std::time::Instant::now();
        let limits = thumbnail::Limits {
            max_animate_bytes: u64::MAX,
            ..thumbnail::Limits::default()
        };
        let result = thumbnail::render(&data, &[request], &limits).unwrap();
        println!("{:.1} ms", started.elapsed().as_secs_f64() * 1000.0);
        last = result.into_iter().next();
    }
    match last {
        Some(Ok(thumbnail::Outcome::Made(t))) => {
            println!(
                "{}x{} {} {} bytes",
                t.width,
                t.height,
                t.content_type,
                t.bytes.len()
            );
            std::fs::write(format!("{}.thumb", args[0]), &t.bytes).unwrap();
        }
        other => println!("{other:?}"),
    }
}
