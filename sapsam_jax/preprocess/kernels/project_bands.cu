// Fused sub-region band projection of already-rotated working volumes (paper 2.2-2.3): all
// six sub-regions and all HU bands in one pass over each volume, for one projection axis.
// Prepended: the #define preamble and project_common.cuh (see there).

struct DirectSampler {
    const HU_T* hu;
    const unsigned char* mask;  // nonzero = inside the (refined) lung mask

    __device__ __forceinline__ void operator()(int k, int j, int i, float& v, bool& in_gray,
                                               bool& in_band) const {
        const int idx = (k * NJ + j) * NI + i;
        v = (float)hu[idx];
        in_band = mask[idx] != 0;
        in_gray = false;
    }
};

// hu, mask: (R, NK, NJ, NI); bands: (R, 6, SUB_H, SUB_W, NBANDS) zero-filled by the caller.
// Grid: x over IMG_H * IMG_W rays, y over the R volumes.
extern "C" __global__ void SAPSAM_NAME(sapsam_project_bands_3d)(const HU_T* __restrict__ hu,
                                                                const unsigned char* __restrict__ mask,
                                                                float* __restrict__ bands) {
    const int pixel = blockIdx.x * blockDim.x + threadIdx.x;
    if (pixel >= IMG_H * IMG_W) return;
    const int r = blockIdx.y;
    const long long volume = (long long)r * NK * NJ * NI;
    const DirectSampler sample{hu + volume, mask + volume};
    project_ray<false>(sample, r, pixel / IMG_W, pixel % IMG_W, nullptr, bands, 0.f, 1.f);
}
