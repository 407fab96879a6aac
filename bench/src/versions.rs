//! Figure 7: the relay and receive paths of one remote change on the pinned
//! Automerge (0.12) and on 0.6.1, at short and long history. The same code is
//! compiled against both crates (`versions_impl.rs`).

use anyhow::Result;

use crate::report::{percentile, us, Figure};

/// The pinned version.
mod pinned {
    use automerge as am;
    include!("versions_impl.rs");
}

/// The candidate compared with it.
mod v0_6_1 {
    use automerge_06 as am;
    include!("versions_impl.rs");
}

/// Runs figure 7 for each history length.
pub fn run(histories: &[usize], iterations: usize) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    for &history in histories {
        let (p_relay, p_recv) = pinned::measure(history, iterations)?;
        let (o_relay, o_recv) = v0_6_1::measure(history, iterations)?;
        for (path, pinned, other) in [("relay", &p_relay, &o_relay), ("receive", &p_recv, &o_recv)] {
            out.push(
                Figure::info(format!("automerge0.12.{path}.h{history}.p50"), us(percentile(pinned, 50.0)), "µs")
                    .baseline(us(percentile(other, 50.0)), "automerge 0.6.1"),
            );
        }
    }
    Ok(out)
}
