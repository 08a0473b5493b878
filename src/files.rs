//! Files and directories that hold a user's data: readable by their owner alone. A CRM's
//! contacts, a remote's bundle and its queued edits are nobody else's business on a shared
//! machine, whatever the umask.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Owner read, write, enter.
pub const DIR_MODE: u32 = 0o700;
/// Owner read and write.
pub const FILE_MODE: u32 = 0o600;

/// Creates a data directory (and its parents) if missing, and makes it its owner's alone.
pub fn private_dir(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Makes sure a file exists and is its owner's alone, before anything is written to it.
pub fn private_file(path: &Path) -> io::Result<()> {
    OpenOptions::new().create(true).append(true).mode(FILE_MODE).open(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE))
}

/// Writes a file whole, readable by its owner alone: to a temporary file first, renamed over
/// the target once on disk, so a crash leaves the old file or the new one, never half of one.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new().create(true).write(true).truncate(true).mode(FILE_MODE).open(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(FILE_MODE))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_its_owners_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a").join("b");
        private_dir(&data).unwrap();
        let file = data.join("x.json");
        write_private(&file, b"{}").unwrap();
        let db = data.join("x.redb");
        private_file(&db).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&data), mode(&file), mode(&db)), (0o700, 0o600, 0o600));
        assert_eq!(fs::read(&file).unwrap(), b"{}");
        assert!(!data.join("x.tmp").exists());
    }
}
