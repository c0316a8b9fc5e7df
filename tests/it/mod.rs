mod alsa;
mod cli;
mod common;
mod osc_live;
mod render;
