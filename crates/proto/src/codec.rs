//! Prost encoding with small first buffers. tonic's default allocates 8 KiB
//! for every request stream as it opens, before any body arrives; a flood
//! of stalled streams (headers sent, body never completed) then costs 8 KiB
//! each. Istio's requests are about 1-2 KiB (a CSR and a little metadata),
//! so 2 KiB holds a whole one and the buffer grows for anything larger (up
//! to the server's message size limit).

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The first size of each stream's decode and encode buffer.
pub const FIRST_BUFFER: usize = 2 * 1024;

/// tonic's default: yield to the runtime after this much encoded data.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`FIRST_BUFFER`]-sized first buffers.
#[derive(Debug, Clone, Default)]
pub struct SmallBufferCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(FIRST_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(FIRST_BUFFER, YIELD_THRESHOLD))
    }
}
