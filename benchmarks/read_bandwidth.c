/* Peak streaming read rate of this machine: 600 MB of floats summed with AVX-512 by 1 and 2 OpenMP
   threads, best of 7, with an optional software prefetch distance (floats). The ceiling any batch-1
   decoder can reach (docs/llama.md). Build and run:
       gcc -O3 -march=native -fopenmp benchmarks/read_bandwidth.c -o /tmp/read_bandwidth
       /tmp/read_bandwidth 0; /tmp/read_bandwidth 1024                                              */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t n = (size_t)600<<20; /* 600 MB of floats region */
  size_t nf = n/4;
  float *a = aligned_alloc(64, n);
  for(size_t i=0;i<nf;i++) a[i]=(float)(i&1023);
  int pf = argc>1?atoi(argv[1]):0;
  for(int th=1; th<=2; th++){
    double best=1e9; float sink=0;
    for(int r=0;r<7;r++){
      double t=now();
      float tot=0;
      #pragma omp parallel num_threads(th) reduction(+:tot)
      {
        int nt=omp_get_num_threads(), id=omp_get_thread_num();
        size_t chunk=nf/nt, lo=id*chunk, hi=lo+chunk;
        __m512 s0=_mm512_setzero_ps(),s1=s0,s2=s0,s3=s0;
        for(size_t i=lo;i<hi;i+=64){
          if(pf) _mm_prefetch((const char*)(a+i+pf),_MM_HINT_T0);
          s0=_mm512_add_ps(s0,_mm512_load_ps(a+i));
          s1=_mm512_add_ps(s1,_mm512_load_ps(a+i+16));
          s2=_mm512_add_ps(s2,_mm512_load_ps(a+i+32));
          s3=_mm512_add_ps(s3,_mm512_load_ps(a+i+48));
        }
        tot+=_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0,s1),_mm512_add_ps(s2,s3)));
      }
      t=now()-t; if(t<best)best=t; sink+=tot;
    }
    printf("threads %d prefetch %d: %.1f GB/s (best of 7) %g\n", th, pf, n/best/1e9, sink);
  }
  return 0;
}
