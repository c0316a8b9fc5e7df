mod alsa;
mod cli;
mod common;
mod jack;
mod jackd;
mod osc_live;
mod render;
