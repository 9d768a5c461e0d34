//! Files the user owns: size-bounded reads, atomic writes, and output directories that replace
//! nothing until the new output is complete.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Reads a text file, refusing files over `limit` bytes (so a wrong path to a huge file gives a
/// clear error instead of exhausting memory).
pub fn read_small_file(path: &Path, limit: u64) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > limit {
        return Err(Error::Invalid(format!(
            "{}: {len} bytes is larger than the {limit}-byte limit for this kind of file",
            path.display()
        )));
    }
    let mut s = String::new();
    file.take(limit)
        .read_to_string(&mut s)
        .map_err(|e| Error::io(path, e))?;
    Ok(s)
}

/// Writes `path` through a temporary file in the same directory, fsynced and renamed into place:
/// a reader never sees a half-written file and an interrupted write leaves the old one intact.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(&file);
        write(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Checks that `out` is absent or an empty directory (or, with `overwrite`, any directory) and
/// creates a sibling temporary directory to write into; [`finish_output_dir`] renames it into
/// place. Nothing the user had is touched until the new output is complete.
pub fn prepare_output_dir(out: &Path, overwrite: bool) -> Result<PathBuf> {
    if out.exists() || out.is_symlink() {
        if !out.is_dir() || out.is_symlink() {
            return Err(Error::Invalid(format!(
                "{}: exists and is not a directory; choose another --out",
                out.display()
            )));
        }
        let empty = std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_none();
        if !empty && !overwrite {
            return Err(Error::Invalid(format!(
                "{}: already exists and is not empty; choose another --out, or pass --overwrite to replace it",
                out.display()
            )));
        }
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(".{}.tmp-{}", dir_name(out), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}

fn dir_name(out: &Path) -> String {
    out.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into())
}

/// Renames the finished temporary directory onto `out` (an existing `out`, allowed by
/// [`prepare_output_dir`], is renamed aside first and deleted only after the new one is in
/// place), or removes the temporary directory if `result` is an error.
pub fn finish_output_dir<T>(tmp: &Path, out: &Path, result: Result<T>) -> Result<T> {
    match result {
        Ok(v) => {
            let old = out.with_file_name(format!(".{}.old-{}", dir_name(out), std::process::id()));
            let replaced = out.exists();
            if replaced {
                std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
            }
            if let Err(e) = std::fs::rename(tmp, out) {
                if replaced {
                    let _ = std::fs::rename(&old, out); // put the user's directory back
                }
                return Err(Error::io(out, e));
            }
            if replaced {
                // Never follows symlinks: a link inside the old directory is removed, not its target.
                let _ = std::fs::remove_dir_all(&old);
            }
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(tmp);
            Err(e)
        }
    }
}
