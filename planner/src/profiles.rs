//! Loading machine and link profiles from a `profiles/` directory, with errors that name the file and field.

use std::path::{Path, PathBuf};

use lemur_protocol::{FieldError, LinkProfile, MachineProfile};
use serde::Deserialize;

/// The file in a profiles directory that describes links; every other `*.toml` is a machine.
pub const LINKS_FILE: &str = "links.toml";

/// Why profiles could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: FieldError },
    #[error("{dir}: no machine profiles (*.toml other than {LINKS_FILE})")]
    Empty { dir: PathBuf },
    #[error("machine `{name}` is defined twice: {first} and {second}")]
    Duplicate { name: String, first: PathBuf, second: PathBuf },
    #[error("no machine profile named `{name}`; the profiles define: {available}")]
    UnknownMachine { name: String, available: String },
    #[error("no link joins `{a}` and `{b}`; add a [[link]] to {LINKS_FILE} (\"*\" matches any machine)")]
    NoLink { a: String, b: String },
    #[error(
        "{file}: no link joins `{a}` and `{b}`: {detail}; add a [[link]] between them (\"*\" matches any machine)"
    )]
    NoLinkIn { a: String, b: String, file: PathBuf, detail: String },
}

/// Every machine profile and link found in a directory.
#[derive(Debug, Clone)]
pub struct ProfileSet {
    /// Machine profiles with the file each came from, sorted by name.
    pub machines: Vec<(MachineProfile, PathBuf)>,
    pub links: Vec<LinkProfile>,
    /// Where the links came from (or would have: the file may be missing).
    pub links_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinksFile {
    link: Vec<LinkProfile>,
}

fn read(path: &Path) -> Result<String, ProfileError> {
    std::fs::read_to_string(path).map_err(|source| ProfileError::Io { path: path.to_path_buf(), source })
}

/// Parses and validates one machine profile's TOML.
pub fn parse_machine(path: &Path, text: &str) -> Result<MachineProfile, ProfileError> {
    let p: MachineProfile =
        toml::from_str(text).map_err(|e| ProfileError::Parse { path: path.to_path_buf(), message: one_line(&e) })?;
    p.validate().map_err(|source| ProfileError::Invalid { path: path.to_path_buf(), source })?;
    Ok(p)
}

/// Parses and validates a links file's TOML.
pub fn parse_links(path: &Path, text: &str) -> Result<Vec<LinkProfile>, ProfileError> {
    let f: LinksFile =
        toml::from_str(text).map_err(|e| ProfileError::Parse { path: path.to_path_buf(), message: one_line(&e) })?;
    for (i, l) in f.link.iter().enumerate() {
        l.validate()
            .map_err(|e| ProfileError::Invalid { path: path.to_path_buf(), source: e.within(&format!("link[{i}]")) })?;
    }
    Ok(f.link)
}

/// toml's messages span several lines with a source excerpt; keep them, joined readably.
fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(_) => format!("{msg}\n{}", e.to_string().trim_end()),
        None => msg,
    }
}

impl ProfileSet {
    /// Loads every `*.toml` in `dir`: [`LINKS_FILE`] as links, the rest as machines.
    pub fn load(dir: &Path) -> Result<Self, ProfileError> {
        let entries = std::fs::read_dir(dir).map_err(|source| ProfileError::Io { path: dir.to_path_buf(), source })?;
        let mut paths = Vec::new();
        for e in entries {
            let e = e.map_err(|source| ProfileError::Io { path: dir.to_path_buf(), source })?;
            let path = e.path();
            if path.extension().is_some_and(|x| x == "toml") {
                paths.push(path);
            }
        }
        paths.sort();
        let mut machines: Vec<(MachineProfile, PathBuf)> = Vec::new();
        let mut links = Vec::new();
        for path in paths {
            let text = read(&path)?;
            if path.file_name().is_some_and(|n| n == LINKS_FILE) {
                links = parse_links(&path, &text)?;
                continue;
            }
            let p = parse_machine(&path, &text)?;
            if let Some((_, first)) = machines.iter().find(|(m, _)| m.name == p.name) {
                return Err(ProfileError::Duplicate { name: p.name, first: first.clone(), second: path });
            }
            machines.push((p, path));
        }
        if machines.is_empty() {
            return Err(ProfileError::Empty { dir: dir.to_path_buf() });
        }
        machines.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(Self { machines, links, links_file: Some(dir.join(LINKS_FILE)) })
    }

    /// Checks that every pair of `names` (a cluster's machines) is joined by a link, with
    /// an error that names the links file and says what it lacks: the file itself, or a
    /// link, listing the names in it that are no machine of these profiles.
    pub fn check_links(&self, names: &[&str]) -> Result<(), ProfileError> {
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                if find_link(&self.links, a, b).is_ok() {
                    continue;
                }
                let Some(file) = self.links_file.clone() else {
                    return Err(ProfileError::NoLink { a: a.to_string(), b: b.to_string() });
                };
                let detail = if !file.exists() {
                    "the file does not exist".to_string()
                } else if self.links.is_empty() {
                    "it has no [[link]] entries".to_string()
                } else {
                    let known = |n: &str| n == "*" || self.machines.iter().any(|(m, _)| m.name == n);
                    let mut unknown: Vec<&str> = self
                        .links
                        .iter()
                        .flat_map(|l| l.between.iter())
                        .map(String::as_str)
                        .filter(|n| !known(n))
                        .collect();
                    unknown.sort();
                    unknown.dedup();
                    let pairs: Vec<String> = self
                        .links
                        .iter()
                        .map(|l| format!("{} ({} - {})", l.name, l.between[0], l.between[1]))
                        .collect();
                    let mut d = format!("its links are {}", pairs.join(", "));
                    if !unknown.is_empty() {
                        d += &format!("; `{}` name no machine profile here", unknown.join("`, `"));
                    }
                    d
                };
                return Err(ProfileError::NoLinkIn { a: a.to_string(), b: b.to_string(), file, detail });
            }
        }
        Ok(())
    }

    /// The profile named `name`.
    pub fn machine(&self, name: &str) -> Result<&MachineProfile, ProfileError> {
        self.machines.iter().map(|(m, _)| m).find(|m| m.name == name).ok_or_else(|| ProfileError::UnknownMachine {
            name: name.to_string(),
            available: self.machines.iter().map(|(m, _)| m.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The most specific link joining machines `a` and `b`.
    pub fn link(&self, a: &str, b: &str) -> Result<&LinkProfile, ProfileError> {
        find_link(&self.links, a, b)
    }
}

/// The most specific link in `links` joining machines `a` and `b`.
pub fn find_link<'a>(links: &'a [LinkProfile], a: &str, b: &str) -> Result<&'a LinkProfile, ProfileError> {
    links
        .iter()
        .filter_map(|l| l.matches(a, b).map(|s| (s, l)))
        .max_by_key(|(s, _)| *s)
        .map(|(_, l)| l)
        .ok_or_else(|| ProfileError::NoLink { a: a.to_string(), b: b.to_string() })
}
