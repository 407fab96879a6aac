//! Wire format of the node–relay sync protocol (being written; see ARCHITECTURE.md).
