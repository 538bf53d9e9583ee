//! netbuffer
