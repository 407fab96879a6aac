//! Sans-IO sync core (being written; see ARCHITECTURE.md).
