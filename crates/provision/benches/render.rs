//! How long one `render` of the quickstart inventory takes in process: load the embedded layers and
//! the inventory, evaluate, check, render every file (no writes). `cargo xtask bench` runs this.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use provision::VarsInput;

const WARMUP: usize = 20;
const ITERATIONS: usize = 200;

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let vars = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart/vars.yml");
    let out = std::env::temp_dir().join("mmrctl-bench-render");
    let inputs = [VarsInput::File(vars)];
    let once = || {
        let start = Instant::now();
        let result = provision::render(&inputs, Some(&out));
        let elapsed = start.elapsed();
        if let Err(d) = result {
            panic!("the quickstart does not render: {:?}", d.errors);
        }
        elapsed
    };
    for _ in 0..WARMUP {
        once();
    }
    let mut times: Vec<Duration> = (0..ITERATIONS).map(|_| once()).collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(times[ITERATIONS / 2]);
    let p99 = ms(times[ITERATIONS * 99 / 100]);
    let max = ms(times[ITERATIONS - 1]);
    if json {
        println!(
            "{{\"name\":\"render_quickstart\",\"iterations\":{ITERATIONS},\"median_ms\":{median:.3},\"p99_ms\":{p99:.3},\"max_ms\":{max:.3}}}"
        );
    } else {
        println!(
            "render quickstart: median {median:.3} ms, p99 {p99:.3} ms, max {max:.3} ms ({ITERATIONS} runs)"
        );
    }
}
