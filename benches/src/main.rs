//! `ringbench --impl {virtq|virtq-log|virtq-net|virtq-net-log|virtq-packed|rustvmm|memcpy} --shape {1desc|2desc|indirect4} --size {64|1500}
//! --dir {tx|rx} --iters N [--time [--warmup W] [--reps R]]`
//!
//! Without `--time`: setup, then N batches of 32 chains, then verification. Setup and
//! verification cost do not depend on N, so under callgrind
//! `Ir/chain = (Ir(N2) - Ir(N1)) / ((N2 - N1) * 32)`.
//!
//! With `--time`: setup, W warm-up batches, then R timed runs of N batches each; prints the best
//! and the median wall-clock ns per chain (`ns_per_chain=` is the best).

use std::process::ExitCode;
use std::time::Instant;

use virtq_benches::{run, Dir, Impl, Shape, Workload, BATCH};

const USAGE: &str =
    "usage: ringbench --impl {virtq|virtq-log|virtq-net|virtq-net-log|virtq-packed|rustvmm|memcpy} --shape {1desc|2desc|indirect4} \
--size BYTES --dir {tx|rx} --iters BATCHES [--time [--warmup BATCHES] [--reps R]]";

struct Args {
    imp: Impl,
    shape: Shape,
    size: usize,
    dir: Dir,
    iters: u64,
    time: bool,
    warmup: Option<u64>,
    reps: u32,
}

fn parse() -> Result<Args, String> {
    let mut imp = None;
    let mut shape = None;
    let mut size = None;
    let mut dir = None;
    let mut iters = None;
    let mut time = false;
    let mut warmup = None;
    let mut reps = 5;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--time" {
            time = true;
            continue;
        }
        if a == "-h" || a == "--help" {
            return Err(String::new());
        }
        let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--impl" => {
                imp = Some(match v.as_str() {
                    "virtq" => Impl::Virtq,
                    "virtq-log" => Impl::VirtqLog,
                    "virtq-net" => Impl::VirtqNet,
                    "virtq-net-log" => Impl::VirtqNetLog,
                    "rustvmm" | "rust-vmm" => Impl::RustVmm,
                    "memcpy" => Impl::Memcpy,
                    "virtq-packed" => Impl::VirtqPacked,
                    _ => return Err(format!("unknown impl {v}")),
                })
            }
            "--shape" => {
                shape = Some(match v.as_str() {
                    "1desc" => Shape::OneDesc,
                    "2desc" => Shape::TwoDesc,
                    "indirect4" => Shape::Indirect4,
                    _ => return Err(format!("unknown shape {v}")),
                })
            }
            "--dir" => {
                dir = Some(match v.as_str() {
                    "tx" => Dir::Tx,
                    "rx" => Dir::Rx,
                    _ => return Err(format!("unknown dir {v}")),
                })
            }
            "--size" => {
                let s = num(&v)? as usize;
                if s == 0 || s + virtq_benches::NET_HDR_LEN > virtq_benches::FRAME_BUF {
                    return Err(format!("--size {s} out of range (1..=2036)"));
                }
                size = Some(s);
            }
            "--iters" => iters = Some(num(&v)?),
            "--warmup" => warmup = Some(num(&v)?),
            "--reps" => reps = num(&v)?.clamp(1, 1000) as u32,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(Args {
        imp: imp.ok_or("--impl is required")?,
        shape: shape.ok_or("--shape is required")?,
        size: size.ok_or("--size is required")?,
        dir: dir.ok_or("--dir is required")?,
        iters: iters.ok_or("--iters is required")?,
        time,
        warmup,
        reps,
    })
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("ringbench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let w = Workload::new(a.shape, a.size, a.dir);
    let mut driver = w.driver();
    let mut dev = a.imp.device(&w);

    let mut batches = 0u64;
    let mut notifications = 0u64;
    let mut samples = Vec::new();
    if a.time {
        let warmup = a.warmup.unwrap_or((a.iters / 4).max(100));
        notifications += run(&mut driver, dev.as_mut(), warmup);
        batches += warmup;
        for _ in 0..a.reps {
            let t = Instant::now();
            notifications += run(&mut driver, dev.as_mut(), a.iters);
            let ns = t.elapsed().as_nanos() as f64;
            batches += a.iters;
            samples.push(ns / (a.iters.max(1) * u64::from(BATCH)) as f64);
        }
    } else {
        notifications += run(&mut driver, dev.as_mut(), a.iters);
        batches += a.iters;
    }

    let chains = batches * u64::from(BATCH);
    if notifications != batches {
        eprintln!("ringbench: {notifications} notifications for {batches} batches (expected one per batch)");
        return ExitCode::FAILURE;
    }
    if let Err(e) = w.verify(dev.as_ref(), chains, a.imp.writes_split_used_ring()).and_then(|()| dev.check_ring()) {
        eprintln!("ringbench: verification failed: {e}");
        return ExitCode::FAILURE;
    }
    print!(
        "impl={:?} shape={} size={} dir={} batches={batches} chains={chains} notifications={notifications}",
        a.imp,
        a.shape.name(),
        a.size,
        a.dir.name(),
    );
    if !samples.is_empty() {
        samples.sort_by(f64::total_cmp);
        print!(" ns_per_chain={:.2} ns_per_chain_median={:.2}", samples[0], samples[samples.len() / 2]);
    }
    println!();
    ExitCode::SUCCESS
}
