mod alsa;
mod cli;
mod common;
mod hours;
mod jack;
mod jackd;
mod osc_live;
mod render;
