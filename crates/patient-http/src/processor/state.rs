//! The processor's lifecycle states.

use std::fmt;

/// Where a processor is in its lifecycle:
/// `Stopped -> Starting -> Running -> Draining -> Stopping -> Stopped`
/// (`Running -> Stopping` directly with `stop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ProcessorState {
    /// Not running; `start` starts it.
    Stopped = 0,
    /// Its runtime is starting.
    Starting = 1,
    /// Accepting and running tasks.
    Running = 2,
    /// Running the tasks it has, refusing new ones.
    Draining = 3,
    /// Finishing or handing back the tasks it has; refusing new ones.
    Stopping = 4,
}

impl ProcessorState {
    pub(crate) fn from_u8(v: u8) -> ProcessorState {
        match v {
            1 => ProcessorState::Starting,
            2 => ProcessorState::Running,
            3 => ProcessorState::Draining,
            4 => ProcessorState::Stopping,
            _ => ProcessorState::Stopped,
        }
    }

    /// The state's name in lower case.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProcessorState::Stopped => "stopped",
            ProcessorState::Starting => "starting",
            ProcessorState::Running => "running",
            ProcessorState::Draining => "draining",
            ProcessorState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for ProcessorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
