//! Fuzz-style tests of every decoder, run by `cargo test`: the bodies of the
//! cargo-fuzz targets (`tests/support/fuzz_bodies.rs`, also used by `fuzz/`)
//! fed with seeded mutations of valid inputs (bit flips, random and boundary
//! bytes, insertions, deletions, truncation, splicing). A panic fails the test
//! with the seed, the target and the input in hex; every such input becomes a
//! file in `tests/fuzz-regressions/<target>/`, replayed below.
//!
//! Quick mode: about 2 s per target. Long mode: `SAMVERKAN_LONG=1` (60 s per
//! target); `SAMVERKAN_FUZZ_SECONDS=N` sets the time per target;
//! `SAMVERKAN_SEED=<seed>` replays a run. Coverage-guided fuzzing: `fuzz/run.sh`.

#[path = "support/fuzz_bodies.rs"]
mod fuzz_bodies;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use automerge::sync::{State, SyncDoc};
use chrono::Utc;
use fuzz_bodies::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use samverkan_shared::bundle::{Bundle, BundleDoc, BundleOrigin};
use samverkan_shared::directory::{EnrollmentDirectory, Member, MemberKind};
use samverkan_shared::identity::NodeId;
use samverkan_shared::model::{Activity, ActivityStatus, DocKind, Document, DocumentContent, EditContext};
use samverkan_shared::org::{Directory, OrgId};
use samverkan_shared::wire::{ErrorCode, Frame, PROTOCOL_VERSION};

const SEED_MD: &str = include_str!("../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

fn a_document(n: usize) -> Document {
    let key = fuzz_relay_key();
    let ctx = EditContext {
        author: NodeId::from_bytes(&key.verifying_key().to_bytes()).unwrap(),
        org: OrgId::new("flen-kommun").unwrap(),
        node_name: "fuzz".into(),
        time: Utc::now(),
    };
    let directory = Directory::sodermanland();
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2026");
    content.parties = vec![OrgId::new("flen-kommun").unwrap(), OrgId::new("polisomrade-sodermanland").unwrap()];
    content.body = "Vi lovar **trygghet** i centrum.\n".into();
    let id = fuzz_doc_ids()[n % 3].clone();
    let mut doc = Document::create(id, content, &ctx, &directory).unwrap();
    doc.edit(&ctx, &directory, "add", |e| {
        e.add_activity(&Activity {
            id: samverkan_shared::ids::ItemId::random(),
            what: "Trygghetsvandring".into(),
            owners: Vec::new(),
            followup_method: None,
            due: None,
            status: ActivityStatus::Planned,
        })
    })
    .unwrap();
    doc
}

/// Valid inputs to start mutating from, per target.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "wire_frame" => {
            let frames = [
                Frame::Hello {
                    protocol: PROTOCOL_VERSION,
                    software: "samverkan-node 0.1".into(),
                    node: "ab".repeat(32),
                    directory: None,
                },
                Frame::Welcome { protocol: PROTOCOL_VERSION, relay: "relay".into(), limits: None },
                Frame::Summary { docs: 3, digest: [9; 32] },
                Frame::DocHeads { entries: fuzz_doc_ids().into_iter().map(|d| (d, [1; 8])).collect() },
                Frame::InSync,
                Frame::Sync { doc: fuzz_doc_ids()[0].clone(), message: vec![0x42, 1, 2, 3] },
                Frame::Error { code: ErrorCode::from_u16(3), message: "nope".into() },
                Frame::Join {
                    protocol: PROTOCOL_VERSION,
                    software: "x".into(),
                    secret: vec![5; 16],
                    org: "flen-kommun".into(),
                },
                Frame::Directory { signed: b"{}".to_vec() },
                Frame::Receipts {
                    doc: fuzz_doc_ids()[1].clone(),
                    entries: vec![samverkan_shared::wire::ReceiptEntry {
                        record: [4; 64],
                        received_at_ms: 1_700_000_000_000,
                        relay_signature: [6; 64],
                    }],
                },
            ];
            let mut all = vec![7u8];
            for f in &frames {
                all.extend(f.encode());
            }
            let mut out: Vec<Vec<u8>> = frames
                .iter()
                .map(|f| {
                    let mut v = vec![3u8];
                    v.extend(f.encode());
                    v
                })
                .collect();
            out.push(all);
            out
        }
        "relay_sync" => {
            let mut out = Vec::new();
            for n in 0..3 {
                let mut doc = a_document(n);
                let mut state = State::new();
                let mut records = Vec::new();
                // The first message (heads and a bloom filter), then one with changes
                // as if the relay had answered with an empty have.
                let first = doc.automerge_mut().sync().generate_sync_message(&mut state).unwrap();
                records.extend(relay_record((n * 3) as u8, &first.clone().encode()));
                let mut empty = automerge::AutoCommit::new();
                let mut their = State::new();
                empty.sync().receive_sync_message(&mut their, first).unwrap();
                if let Some(reply) = empty.sync().generate_sync_message(&mut their) {
                    doc.automerge_mut().sync().receive_sync_message(&mut state, reply).unwrap();
                }
                if let Some(changes) = doc.automerge_mut().sync().generate_sync_message(&mut state) {
                    records.extend(relay_record((n * 3) as u8, &changes.encode()));
                }
                records.extend(relay_record(2, &[]));
                records.extend(relay_record(1, &Frame::Summary { docs: 1, digest: [0; 32] }.encode()[4..]));
                out.push(records);
            }
            out
        }
        "bundle_import" => {
            let origin =
                BundleOrigin { node: "ab".repeat(32), org: "flen".into(), name: "Flen".into(), created: Utc::now() };
            let docs = (0..2)
                .map(|n| {
                    let mut doc = a_document(n);
                    BundleDoc {
                        id: fuzz_doc_ids()[n].clone(),
                        data: doc.automerge_mut().save(),
                        signatures: sign_all(&fuzz_doc_ids()[n], doc.automerge_mut()),
                    }
                })
                .collect();
            let bundle =
                |docs| Bundle { origin: origin.clone(), relay_key: None, directory: None, docs, receipts: vec![] };
            vec![bundle(docs).encode(), bundle(vec![]).encode()]
        }
        "bundle_docs" => (0..3).map(|n| a_document(n).automerge_mut().save()).collect(),
        "markdown_import" => {
            let directory = Directory::sodermanland();
            let exported = samverkan_shared::markdown::export(&a_document(0).view().unwrap(), &directory);
            vec![SEED_MD.as_bytes().to_vec(), exported.into_bytes()]
        }
        "signed_directory" => {
            let key = fuzz_relay_key();
            let mut directory = EnrollmentDirectory::default();
            directory
                .enroll(Member {
                    key: NodeId::from_bytes(&[3; 32])
                        .unwrap_or_else(|_| NodeId::from_bytes(&key.verifying_key().to_bytes()).unwrap()),
                    kind: MemberKind::Node,
                    org: OrgId::new("flen-kommun").unwrap(),
                    name: "Flen BF-samordnare".into(),
                    role: None,
                    enrolled_at: Utc::now(),
                    revoked_at: None,
                })
                .unwrap();
            let relay = NodeId::from_bytes(&key.verifying_key().to_bytes()).unwrap();
            let code = format!("svk1.{}.{}.127.0.0.1:7878", "0f".repeat(16), relay);
            vec![directory.sign(&key).encode(), code.into_bytes()]
        }
        other => panic!("no seeds for {other}"),
    }
}

const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xfe, 0x40, 0x20];

fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..rng.gen_range(1..=4) {
        let len = input.len();
        match rng.gen_range(0..8) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] = rng.gen();
            }
            2 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
            }
            3 => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..16);
                for _ in 0..n {
                    input.insert(i, rng.gen());
                }
            }
            4 if len > 0 => {
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(32));
                input.drain(i..i + n);
            }
            5 if len > 0 => input.truncate(rng.gen_range(0..len)),
            6 => {
                let other = &pool[rng.gen_range(0..pool.len())];
                if !other.is_empty() {
                    let from = rng.gen_range(0..other.len());
                    let to = rng.gen_range(from..=other.len());
                    let at = rng.gen_range(0..=len);
                    input.splice(at..at, other[from..to].iter().copied());
                }
            }
            _ if len >= 4 => {
                // Overwrite a little-endian u32 with a boundary value (length prefixes).
                let i = rng.gen_range(0..=len - 4);
                let v: u32 = [0, 1, 0xffff_ffff, 0x8000_0000, 65_535, 65_536][rng.gen_range(0..6)];
                input[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
}

fn seconds_per_target() -> f64 {
    if let Ok(s) = std::env::var("SAMVERKAN_FUZZ_SECONDS") {
        return s.parse().expect("SAMVERKAN_FUZZ_SECONDS must be a number");
    }
    if std::env::var("SAMVERKAN_LONG").is_ok_and(|v| v != "0" && !v.is_empty()) {
        60.0
    } else {
        2.0
    }
}

#[test]
fn every_decoder_survives_seeded_mutations() {
    let seed: u64 =
        std::env::var("SAMVERKAN_SEED").map(|s| s.parse().expect("numeric seed")).unwrap_or_else(|_| rand::random());
    let budget = Duration::from_secs_f64(seconds_per_target());
    println!("fuzz_decoders: seed {seed}, {budget:?} per target (replay with SAMVERKAN_SEED={seed})");
    let pools: Vec<Vec<Vec<u8>>> = TARGETS.iter().map(|(name, _)| seeds(name)).collect();
    // Quiet the default hook: a panic is reported below with its input.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for ((name, body), pool) in TARGETS.into_iter().zip(pools) {
        let mut rng = StdRng::seed_from_u64(seed ^ name.len() as u64);
        for input in &pool {
            if catch_unwind(|| body(input)).is_err() {
                failures.push(format!("{name}: a valid seed input panics: {}", hex(input)));
            }
        }
        let started = Instant::now();
        let mut runs = 0u64;
        while started.elapsed() < budget {
            let mut input = pool[rng.gen_range(0..pool.len())].clone();
            mutate(&mut rng, &mut input, &pool);
            runs += 1;
            if catch_unwind(AssertUnwindSafe(|| body(&input))).is_err() {
                failures.push(format!("{name}: input {}", hex(&input)));
                break;
            }
        }
        println!("fuzz_decoders: {name}: {runs} executions");
    }
    std::panic::set_hook(hook);
    assert!(
        failures.is_empty(),
        "panics (seed {seed}; save each input under tests/fuzz-regressions/<target>/):\n{}",
        failures.join("\n")
    );
}

/// With `SAMVERKAN_WRITE_CORPUS=<dir>`, writes the valid seed inputs to
/// `<dir>/<target>/` as a starting corpus for `cargo fuzz` (`fuzz/run.sh` does).
#[test]
fn write_seed_corpus() {
    let Ok(dir) = std::env::var("SAMVERKAN_WRITE_CORPUS") else { return };
    for (name, _) in TARGETS {
        let target = Path::new(&dir).join(name);
        std::fs::create_dir_all(&target).unwrap();
        for (i, input) in seeds(name).iter().enumerate() {
            std::fs::write(target.join(format!("seed-{i}")), input).unwrap();
        }
    }
}

/// Every input a fuzzer ever crashed on stays fixed.
#[test]
fn fuzz_regressions_stay_fixed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut replayed = 0;
    for (name, body) in TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(name)) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let bytes = if path.extension().is_some_and(|e| e == "hex") {
                decode_hex(std::str::from_utf8(&bytes).unwrap().trim())
            } else {
                bytes
            };
            body(&bytes);
            replayed += 1;
        }
    }
    println!("replayed {replayed} regression inputs");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
}
