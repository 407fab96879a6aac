//! Documents to measure with: built in memory through the real model (typed
//! edits, one Automerge change each), then stored or synced by the figures.

use anyhow::Result;
use automerge::ChangeHash;
use chrono::Utc;
use samverkan_shared::identity::NodeKey;
use samverkan_shared::ids::{DocId, ItemId};
use samverkan_shared::model::{Activity, ActivityStatus, DocKind, Document, DocumentContent, EditContext};
use samverkan_shared::org::Directory;

/// The signed county agreement: the size of a realistic document.
pub const SEED: &str =
    include_str!("../../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

/// Keys of every author the benchmark made, by actor id, so that the
/// in-memory peers can sign their changes as real nodes do.
fn keys() -> &'static std::sync::Mutex<std::collections::HashMap<automerge::ActorId, NodeKey>> {
    static KEYS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<automerge::ActorId, NodeKey>>> =
        std::sync::OnceLock::new();
    KEYS.get_or_init(Default::default)
}

/// Remembers a key so that changes under its actor id can be signed.
pub fn register_key(key: &NodeKey) {
    let copy = NodeKey::from_file_contents(&key.to_file_contents()).expect("a key round-trips its own file format");
    keys().lock().unwrap_or_else(|e| e.into_inner()).insert(key.node_id().actor_id(), copy);
}

/// The author's signature of a change of `doc`, if the benchmark made the author's key.
pub fn sign(
    doc: &samverkan_shared::ids::DocId,
    hash: &ChangeHash,
    actor: &automerge::ActorId,
) -> Option<samverkan_shared::authorship::ChangeSignature> {
    let keys = keys().lock().unwrap_or_else(|e| e.into_inner());
    keys.get(actor).map(|key| samverkan_shared::authorship::sign(key, doc, hash))
}

/// Who makes the edits, and the directory they are checked against.
pub struct Author {
    /// Stamped on every change.
    pub ctx: EditContext,
    /// Organisation directory.
    pub directory: Directory,
}

impl Author {
    /// A fresh identity in organisation `org`.
    pub fn new(org: &str) -> Self {
        let directory = Directory::sodermanland();
        let key = NodeKey::generate();
        register_key(&key);
        let org =
            directory.resolve(org).map(|o| o.id.clone()).unwrap_or_else(|| directory.organisations()[0].id.clone());
        let ctx = EditContext { author: key.node_id(), org, node_name: "bench".into(), time: Utc::now() };
        Self { ctx, directory }
    }

    /// The author of an existing node.
    pub fn of(node: &samverkan_node::node::Node) -> Self {
        Self { ctx: node.edit_context(), directory: node.directory().clone() }
    }

    /// Every party of the county: county-wide documents reach every node.
    fn everyone(&self) -> Vec<samverkan_shared::org::OrgId> {
        self.directory.organisations().iter().map(|o| o.id.clone()).collect()
    }

    /// A small edit: the title, numbered `i` (one short text change).
    pub fn small_edit(&self, doc: &mut Document, i: usize) -> Result<Option<ChangeHash>> {
        let title = format!("Åtgärdsplan, version {i}");
        Ok(doc.edit(&self.ctx, &self.directory, "title", |e| e.set_title(&title))?.1)
    }

    /// A plan with `changes` changes of history: created, then small edits.
    pub fn plan_with_history(&self, changes: usize) -> Result<Document> {
        let mut content = DocumentContent::new(DocKind::OperationsPlan, "Åtgärdsplan");
        content.body = "Kort plan.".into();
        content.parties = self.everyone();
        let mut doc = Document::create(DocId::random(), content, &self.ctx, &self.directory)?;
        for i in 1..changes {
            self.small_edit(&mut doc, i)?;
        }
        Ok(doc)
    }

    /// A realistic document: an agreement or a plan with the seed agreement's
    /// text, parties and about twenty edits of history (activities, titles, body).
    pub fn realistic(&self, n: usize) -> Result<Document> {
        let kind = if n.is_multiple_of(2) { DocKind::Agreement } else { DocKind::OperationsPlan };
        let mut content = DocumentContent::new(kind, format!("Samverkan {n}"));
        content.body = SEED.to_string();
        content.parties = self.everyone();
        let mut doc = Document::create(DocId::random(), content, &self.ctx, &self.directory)?;
        for i in 0..8 {
            let activity = Activity {
                id: ItemId::random(),
                what: format!("Trygghetsvandring {i} i centrum"),
                owners: Vec::new(),
                followup_method: None,
                due: None,
                status: ActivityStatus::Planned,
            };
            doc.edit(&self.ctx, &self.directory, "activity", |e| e.add_activity(&activity))?;
        }
        for i in 0..8 {
            self.small_edit(&mut doc, i)?;
        }
        let body = SEED.replacen("Styrgruppen", "Den gemensamma styrgruppen", 1);
        doc.edit(&self.ctx, &self.directory, "body", |e| e.set_body(&body))?;
        Ok(doc)
    }
}
