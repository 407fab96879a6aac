//! The main job (`cargo run --example sodermanland`) played out in full, so
//! that it can never silently break: its end state is asserted here.

use samverkan::playout::{self, Options};
use samverkan::shared::approval::ApprovalState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_county_plays_out_and_converges_with_the_agreement_approved_then_changed() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("sodermanland");
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        playout::run(Options { dir: dir.clone(), keep_running: false }),
    )
    .await
    .expect("the play-out finishes within five minutes")
    .expect("the play-out succeeds");
    assert_eq!(outcome.nodes, 11);
    assert_eq!(outcome.documents, 11, "the agreement, the plan and nine citizen promises");
    assert_eq!(outcome.agreement_state, ApprovalState::ChangedSinceApproval);
    assert!(outcome.bundle_verified);
    assert!(outcome.messages > 0 && outcome.bytes > 0);
    assert!(playout::looks_played_out(&dir));
}
