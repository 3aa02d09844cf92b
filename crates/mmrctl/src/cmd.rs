//! One module per subcommand; each parses its arguments and calls the library that does the work
//! (a module is named for its subcommand, the library crate it calls may share the name).

pub(crate) mod admin;
pub(crate) mod archive;
pub(crate) mod datastores;
pub(crate) mod doctor;
pub(crate) mod import;
pub(crate) mod keys;
pub(crate) mod render;
pub(crate) mod serve;
