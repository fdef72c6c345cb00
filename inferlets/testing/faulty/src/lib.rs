//! An inferlet that misbehaves as its first argument says: `trap`
//! (panics), `loop` (never returns), `alloc` (grows memory without end),
//! `ok` (sends "fine" and returns), `echo` (sends back every client
//! message until the client stops). Used by the runtime's tests.

use std::hint::black_box;

async fn main() -> Result<(), String> {
    let args = inferlet::args();
    match args.first().map(String::as_str) {
        Some("trap") => panic!("faulty inferlet: trapping on purpose"),
        Some("loop") => {
            let mut x = 0u64;
            loop {
                x = black_box(x.wrapping_add(1));
            }
        }
        Some("alloc") => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(black_box(vec![1u8; 1 << 20]));
            }
        }
        Some("echo") => {
            while let Some(m) = inferlet::receive() {
                inferlet::send(&format!("echo: {m}"));
            }
            Ok(())
        }
        Some("ok") => {
            inferlet::send("fine");
            Ok(())
        }
        other => Err(format!("unknown mode {other:?}: trap, loop, alloc, ok or echo")),
    }
}

inferlet::main!(main);
