//! Scene errors that say which file, line and field, so an operator can fix a scene without
//! reading the engine's source.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a scene, located in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The field as a dotted path, e.g. `instrument[2].polyphony`.
    pub field: String,
    pub message: String,
    /// 1-based line and column; `None` when the field is absent from the file.
    pub line: Option<usize>,
    pub column: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum SceneError {
    #[error("{path}: cannot read scene file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", DisplayProblems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl SceneError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            SceneError::Io { .. } => &[],
            SceneError::Invalid { problems, .. } => problems,
        }
    }
}

struct DisplayProblems<'a>(&'a PathBuf, &'a Vec<Problem>);

impl fmt::Display for DisplayProblems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.1.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.0.display())?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
                if let Some(col) = p.column {
                    write!(f, ":{col}")?;
                }
            }
            if p.field.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": field `{}`: {}", p.field, p.message)?;
            }
        }
        Ok(())
    }
}
