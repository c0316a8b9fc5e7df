mod alsa;
mod cli;
mod common;
mod jack;
mod osc_live;
mod render;
