//! Denormal numbers flushed to zero while the engine renders. A reverb tail or a filter decaying
//! into silence passes through denormal floats, which x86 and ARM handle in microcode at up to a
//! hundred times the cost of a normal multiply: a quiet room would then cost the audio thread
//! more than a busy one. The mode is set for one `process` call and put back after, because the
//! thread belongs to the audio host; offline renders set it too, so both give the same samples.

pub struct FlushDenormals {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    saved: u64,
}

impl FlushDenormals {
    #[inline]
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // MXCSR bit 15: flush to zero; bit 6: denormals are zero.
            let mut csr: u32 = 0;
            // SAFETY: stmxcsr/ldmxcsr read and write the SSE control register of this thread
            // only; x86_64 always has SSE.
            unsafe {
                std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
                let set = csr | 0x8040;
                std::arch::asm!("ldmxcsr [{}]", in(reg) &set, options(nostack));
            }
            FlushDenormals { saved: csr as u64 }
        }
        #[cfg(target_arch = "aarch64")]
        {
            let fpcr: u64;
            // SAFETY: reads and writes this thread's floating-point control register; bit 24
            // is FZ (flush to zero).
            unsafe {
                std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
                std::arch::asm!("msr fpcr, {}", in(reg) fpcr | (1 << 24), options(nomem, nostack));
            }
            FlushDenormals { saved: fpcr }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            FlushDenormals {}
        }
    }
}

impl Default for FlushDenormals {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushDenormals {
    #[inline]
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        {
            let csr = self.saved as u32;
            // SAFETY: restores the value read in `new` on this same thread.
            unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack)) };
        }
        #[cfg(target_arch = "aarch64")]
        {
            // SAFETY: restores the value read in `new` on this same thread.
            unsafe { std::arch::asm!("msr fpcr, {}", in(reg) self.saved, options(nomem, nostack)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denormals_flush_inside_and_come_back_after() {
        let tiny = std::hint::black_box(f32::MIN_POSITIVE);
        let half = std::hint::black_box(0.5f32);
        assert!((tiny * half) > 0.0, "denormals exist outside");
        {
            let _ftz = FlushDenormals::new();
            let r = std::hint::black_box(tiny) * std::hint::black_box(half);
            if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
                assert_eq!(r, 0.0, "flushed inside");
            }
        }
        assert!((tiny * half) > 0.0, "restored after");
    }
}
