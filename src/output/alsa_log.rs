//! alsa-lib writes its errors to stderr itself: each try of a card that is gone gives several
//! lines, about one a second while it is gone, and they bury the lines the journal is read
//! for. On the thread that opens devices they go to the log at debug level instead.

use std::cell::RefCell;
use std::rc::Rc;

/// alsa-lib's errors on the thread that made it, held until `drain` logs them.
pub struct AlsaErrors(Option<Rc<RefCell<alsa::Output>>>);

impl AlsaErrors {
    /// Takes alsa-lib's errors on this thread from now on.
    pub fn capture() -> Self {
        match alsa::Output::local_error_handler() {
            Ok(o) => AlsaErrors(Some(o)),
            Err(e) => {
                tracing::debug!("alsa-lib's errors stay on stderr: {e}");
                AlsaErrors(None)
            }
        }
    }

    /// Logs, at debug level, what alsa-lib said since the last call.
    pub fn drain(&mut self) {
        let Some(o) = &self.0 else { return };
        let text = o.borrow().to_string();
        if text.is_empty() {
            return;
        }
        for line in text.lines() {
            tracing::debug!("alsa-lib: {line}");
        }
        // A fresh buffer; the old one closes as it drops.
        if let Ok(fresh) = alsa::Output::local_error_handler() {
            self.0 = Some(fresh);
        }
    }
}

impl Drop for AlsaErrors {
    /// What alsa-lib said before play ended early (a build that failed after the device was
    /// tried) may say why the device failed.
    fn drop(&mut self) {
        self.drain();
    }
}
