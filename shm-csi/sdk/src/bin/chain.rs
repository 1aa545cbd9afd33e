//! `spright-shm-chain`: an example chain on the SDK.
//!
//! ```text
//! spright-shm-chain gateway --listen ADDR --next ADDR --region DIR [--work ROUNDS]
//! spright-shm-chain stage   --listen ADDR [--next ADDR] --region DIR
//!                           [--op upper|reverse|none] [--work ROUNDS]
//! ```
//!
//! The gateway accepts HTTP/1.1 requests, reads each body straight into the
//! chain's shared memory, does the function's work on it
//! ([`spright_shm::work`], none by default) and sends its 16-byte descriptor
//! to the first stage. A stage does the work, transforms the bytes in place
//! with `--op`, hands the descriptor to the next stage (if any) and returns
//! the descriptor it gets back. The gateway then writes the result from
//! shared memory as the response. Each function is one thread on the SDK's
//! event-driven runtime ([`spright_shm::event`]): asleep until descriptors
//! arrive, then each run to completion, everything ready sent on in one
//! write.

use std::{io::Write as _, net::TcpListener, path::PathBuf};

use spright_shm::{Pool, event};

struct Args {
    role: String,
    listen: String,
    next: Option<String>,
    region: PathBuf,
    op: String,
    work: u32,
}

const USAGE: &str = "usage: spright-shm-chain gateway|stage --listen ADDR [--next ADDR] --region DIR [--op upper|reverse|none] [--work ROUNDS]";

fn args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let role = it.next().ok_or(USAGE)?;
    if role != "gateway" && role != "stage" {
        return Err(format!("unknown role {role:?}\n{USAGE}"));
    }
    let (mut listen, mut next, mut region, mut op, mut work) =
        (None, None, None, "upper".to_owned(), 0);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(v),
            "--next" => next = Some(v),
            "--region" => region = Some(PathBuf::from(v)),
            "--op" if ["upper", "reverse", "none"].contains(&v.as_str()) => op = v,
            "--op" => return Err(format!("--op {v}: must be upper, reverse or none")),
            "--work" => work = v.parse().map_err(|e| format!("--work {v}: {e}"))?,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if role == "gateway" && next.is_none() {
        return Err("a gateway needs --next".into());
    }
    Ok(Args {
        role,
        listen: listen.ok_or("--listen is required")?,
        next,
        region: region.ok_or("--region is required")?,
        op,
        work,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    let pool = Pool::open(&a.region)?;
    let listener = TcpListener::bind(&a.listen)?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let work = a.work;
    if a.role == "gateway" {
        let next = a.next.as_deref().expect("checked in args");
        event::gateway(&pool, listener, next, |buf| {
            spright_shm::work::apply(buf, work);
        })?;
    } else {
        let op = a.op;
        event::stage(&pool, listener, a.next.as_deref(), |mut buf| {
            spright_shm::work::apply(&mut buf, work);
            match op.as_str() {
                "upper" => buf.make_ascii_uppercase(),
                "reverse" => buf.reverse(),
                _ => {}
            }
            buf
        })?;
    }
    Ok(())
}
