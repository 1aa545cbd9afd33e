//! `spright-shm-chain`: an example chain on the SDK.
//!
//! ```text
//! spright-shm-chain gateway --listen ADDR --next ADDR --region DIR [--work ROUNDS]
//! spright-shm-chain stage   --listen ADDR [--next ADDR] --region DIR
//!                           [--op upper|reverse|none] [--work ROUNDS]
//! ```
//!
//! The gateway accepts HTTP/1.1 `POST`s, reads each body straight into the
//! chain's shared memory, does the function's work on it
//! ([`spright_shm::work`], none by default) and sends its 16-byte descriptor
//! to the first stage. A stage does the work, transforms the bytes in place
//! with `--op`, hands the descriptor to the next stage (if any) and returns
//! the descriptor it gets back. The gateway then writes the result from
//! shared memory as the response, in one write with Nagle off
//! ([`spright_shm::ResponseWriter`]). Every socket has Nagle off. Every hop
//! is a blocking read on an ordinary TCP connection: idle functions use no
//! CPU.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::Arc,
};

use spright_shm::{Pool, ResponseWriter, recv, send};

struct Args {
    role: String,
    listen: String,
    next: Option<String>,
    region: PathBuf,
    op: String,
    work: u32,
}

fn args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let role = it
        .next()
        .ok_or("usage: spright-shm-chain gateway|stage --listen ADDR ...")?;
    let (mut listen, mut next, mut region, mut op, mut work) =
        (None, None, None, "upper".to_owned(), 0);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(v),
            "--next" => next = Some(v),
            "--region" => region = Some(PathBuf::from(v)),
            "--op" => op = v,
            "--work" => work = v.parse().map_err(|e| format!("--work {v}: {e}"))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
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

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Res<()> {
    let a = args()?;
    let pool = Arc::new(Pool::open(&a.region)?);
    let listener = TcpListener::bind(&a.listen)?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    if a.role == "gateway" && a.next.is_none() {
        return Err("a gateway needs --next".into());
    }
    for conn in listener.incoming() {
        let conn = conn?;
        let (pool, role, next, op, work) = (
            Arc::clone(&pool),
            a.role.clone(),
            a.next.clone(),
            a.op.clone(),
            a.work,
        );
        std::thread::spawn(move || {
            let r = if role == "gateway" {
                gateway(&pool, conn, next.as_deref().unwrap_or_default(), work)
            } else {
                stage(&pool, conn, next.as_deref(), &op, work)
            };
            if let Err(e) = r {
                eprintln!("{role}: connection ended: {e}");
            }
        });
    }
    Ok(())
}

fn stage(pool: &Pool, mut conn: TcpStream, next: Option<&str>, op: &str, work: u32) -> Res<()> {
    conn.set_nodelay(true)?;
    let mut downstream = next.map(TcpStream::connect).transpose()?;
    if let Some(d) = &downstream {
        d.set_nodelay(true)?;
    }
    while let Some(d) = recv(&mut conn)? {
        let mut buf = pool.take(d)?;
        spright_shm::work::apply(&mut buf, work);
        match op {
            "upper" => buf.make_ascii_uppercase(),
            "reverse" => buf.reverse(),
            _ => {}
        }
        let mut out = buf.into_descriptor();
        if let Some(s) = downstream.as_mut() {
            send(s, out)?;
            out = recv(s)?.ok_or("next stage closed")?;
        }
        send(&mut conn, out)?;
    }
    Ok(())
}

fn gateway(pool: &Pool, conn: TcpStream, next: &str, work: u32) -> Res<()> {
    let mut first = TcpStream::connect(next)?;
    first.set_nodelay(true)?;
    let mut out = ResponseWriter::new(conn.try_clone()?)?;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse()?;
            } else if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
        let mut buf = match pool.alloc(len) {
            Ok(b) => b,
            Err(e) => {
                // Consume the body so the client sees the answer, not a reset.
                std::io::copy(&mut (&mut r).take(len as u64), &mut std::io::sink())?;
                out.respond(413, "Payload Too Large", e.to_string().as_bytes())?;
                continue;
            }
        };
        // The body goes from the socket straight into shared memory.
        r.read_exact(&mut buf)?;
        spright_shm::work::apply(&mut buf, work);
        send(&mut first, buf.into_descriptor())?;
        let result = pool.take(recv(&mut first)?.ok_or("chain closed")?)?;
        out.respond(200, "OK", &result)?;
        drop(result);
        if close {
            return Ok(());
        }
    }
}
