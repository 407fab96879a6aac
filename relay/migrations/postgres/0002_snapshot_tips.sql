-- Schema 1 -> 2: beside each snapshot, its authors' tips
-- (`samverkan_shared::sync::encode_tips`): the changes whose signatures cover
-- it, so that a document a node has none of is sent whole from its stored
-- bytes without loading it. NULL for snapshots written before, until the
-- document's next compaction (it is then loaded, as before).
ALTER TABLE documents ADD COLUMN snapshot_tips BYTEA;
