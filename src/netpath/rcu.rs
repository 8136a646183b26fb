//! Expedited RCU grace periods while the agent detaches its network hooks.
//!
//! Every tcx link the kernel detaches (and every clsact qdisc it deletes) waits for an RCU
//! grace period while holding RTNL, so detaches run one after another whatever our threads do:
//! on a small VM a grace period is ~20 ms and 50 traced pods took 2.2 s to let go. For the
//! teardown only, the agent turns `/sys/kernel/rcu_expedited` on (grace periods of tens of
//! microseconds, paid for with an IPI to each CPU) and puts the previous value back after.
//!
//! It only touches the knob when it finds it off, writes down in the state directory that it
//! did (`rcu-expedited.json`, pid and start time), and a later start that finds the note of an
//! agent that died mid-teardown turns the knob back off: the node's setting is never left
//! changed. If another live agent already holds the note, this one leaves the knob alone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The kernel's switch.
pub const KNOB: &str = "/sys/kernel/rcu_expedited";
const NOTE: &str = "rcu-expedited.json";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Note {
    pid: u32,
    start_time: u64,
}

/// While alive, the knob is on (if it was this guard that turned it on).
pub struct Expedite {
    /// (knob, note) to undo on drop; `None` when the knob was left as found.
    undo: Option<(PathBuf, PathBuf)>,
}

impl Expedite {
    /// Turns `knob` on when it is off and no live agent holds the note in `dir`.
    pub fn begin(dir: &Path, knob: &Path) -> Expedite {
        let none = Expedite { undo: None };
        match std::fs::read_to_string(knob) {
            Ok(v) if v.trim() == "0" => {}
            _ => return none, // already on, or no such knob (kernel without it, no /sys)
        }
        let note = dir.join(NOTE);
        if read_note(&note).is_some_and(|n| alive(&n)) {
            return none;
        }
        let me = std::process::id();
        let n = Note {
            pid: me,
            start_time: super::clsact::start_time(me).unwrap_or(0),
        };
        // The note first: a crash after the write still leaves a way back.
        let written = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&note, serde_json::to_vec(&n).unwrap_or_default()));
        if let Err(e) = written {
            tracing::debug!(error = %e, "no rcu_expedited note: detaching at normal speed");
            return none;
        }
        if let Err(e) = std::fs::write(knob, "1") {
            tracing::debug!(error = %e, "rcu_expedited not writable: detaching at normal speed");
            let _ = std::fs::remove_file(&note);
            return none;
        }
        Expedite {
            undo: Some((knob.to_path_buf(), note)),
        }
    }

    /// [`Expedite::begin`] on the kernel's knob, noted in the agent's state directory.
    pub fn teardown() -> Expedite {
        Expedite::begin(&super::clsact::state_dir(), Path::new(KNOB))
    }

    /// True when grace periods are expedited now (by this guard or anyone).
    pub fn on() -> bool {
        std::fs::read_to_string(KNOB).is_ok_and(|v| v.trim() == "1")
    }

    /// True when this guard turned the knob on.
    pub fn active(&self) -> bool {
        self.undo.is_some()
    }
}

impl Drop for Expedite {
    fn drop(&mut self) {
        if let Some((knob, note)) = self.undo.take() {
            if let Err(e) = std::fs::write(&knob, "0") {
                tracing::warn!(error = %e, "could not turn {} back off", knob.display());
                return; // the note stays: the next start tries again
            }
            let _ = std::fs::remove_file(note);
        }
    }
}

/// At start: an agent that died while it held the knob on left its note; turn the knob back
/// off and drop the note. Returns true when it did.
pub fn restore_stale(dir: &Path, knob: &Path) -> bool {
    let note = dir.join(NOTE);
    let Some(n) = read_note(&note) else {
        return false;
    };
    if alive(&n) {
        return false;
    }
    if std::fs::write(knob, "0").is_err() {
        return false;
    }
    let _ = std::fs::remove_file(note);
    tracing::info!(
        pid = n.pid,
        "an agent that did not exit cleanly left {} on: turned it back off",
        knob.display()
    );
    true
}

fn read_note(p: &Path) -> Option<Note> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

fn alive(n: &Note) -> bool {
    super::clsact::another_live_agent(n.pid, n.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("llmslo-rcu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn knob_at(d: &Path, v: &str) -> PathBuf {
        let k = d.join("knob");
        std::fs::write(&k, v).unwrap();
        k
    }

    fn value(k: &Path) -> String {
        std::fs::read_to_string(k).unwrap().trim().to_string()
    }

    #[test]
    fn turns_on_and_back_off() {
        let d = tmp("on-off");
        let k = knob_at(&d, "0\n");
        let g = Expedite::begin(&d, &k);
        assert!(g.active());
        assert_eq!(value(&k), "1");
        assert!(d.join(NOTE).exists());
        drop(g);
        assert_eq!(value(&k), "0");
        assert!(!d.join(NOTE).exists());
    }

    #[test]
    fn leaves_a_knob_that_was_on() {
        let d = tmp("was-on");
        let k = knob_at(&d, "1\n");
        let g = Expedite::begin(&d, &k);
        assert!(!g.active());
        drop(g);
        assert_eq!(value(&k), "1");
        assert!(!d.join(NOTE).exists());
    }

    #[test]
    fn no_knob_no_change() {
        let d = tmp("no-knob");
        let g = Expedite::begin(&d, &d.join("absent"));
        assert!(!g.active());
        assert!(!d.join(NOTE).exists());
    }

    #[test]
    fn a_live_holder_is_left_alone() {
        let d = tmp("live");
        let k = knob_at(&d, "0");
        // pid 1 is alive; its real start time makes the note look held.
        let n = Note {
            pid: 1,
            start_time: super::super::clsact::start_time(1).unwrap(),
        };
        std::fs::write(d.join(NOTE), serde_json::to_vec(&n).unwrap()).unwrap();
        let g = Expedite::begin(&d, &k);
        assert!(!g.active());
        assert_eq!(value(&k), "0");
        assert!(!restore_stale(&d, &k), "a live holder's note is not stale");
        assert!(d.join(NOTE).exists());
    }

    #[test]
    fn a_dead_holder_is_undone_at_start() {
        let d = tmp("dead");
        let k = knob_at(&d, "1");
        // pid 1 with a start time it does not have: the holder is gone.
        let n = Note {
            pid: 1,
            start_time: u64::MAX,
        };
        std::fs::write(d.join(NOTE), serde_json::to_vec(&n).unwrap()).unwrap();
        assert!(restore_stale(&d, &k));
        assert_eq!(value(&k), "0");
        assert!(!d.join(NOTE).exists());
        assert!(!restore_stale(&d, &k), "nothing left to undo");
    }
}
